//! The message envelope: requests from clients, exactly one response per request, and
//! the other messages the daemon pushes (events, log lines, exec output).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::events::Event;
use crate::methods::{ExecOutput, LogLine};

/// Identifier a client gives a request; echoed in its response and in the log or exec
/// messages that belong to it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct RequestId(pub u64);

/// A client request. `params` defaults to `null` when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Client-chosen id, echoed in the response.
    pub id: RequestId,
    /// Method name such as `service.start`.
    pub method: String,
    /// Method parameters; each method documents its own shape.
    #[serde(default)]
    pub params: Value,
}

impl Request {
    /// Builds a request from typed parameters.
    pub fn new(id: u64, method: &str, params: impl Serialize) -> Self {
        Request {
            id: RequestId(id),
            method: method.to_owned(),
            params: serde_json::to_value(params).unwrap_or(Value::Null),
        }
    }
}

/// The one response to a request: either `result` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Response {
    /// Id of the request answered; `null` when the request could not be parsed.
    pub id: Option<RequestId>,
    /// Outcome of the request.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Result or error of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The method succeeded; its result.
    Result(Value),
    /// The method failed.
    Error(ErrorObject),
}

impl Response {
    /// A successful response.
    pub fn ok(id: Option<RequestId>, result: impl Serialize) -> Self {
        Response {
            id,
            outcome: Outcome::Result(serde_json::to_value(result).unwrap_or(Value::Null)),
        }
    }

    /// A failed response.
    pub fn err(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        Response {
            id,
            outcome: Outcome::Error(ErrorObject {
                code,
                message: message.into(),
                data: None,
            }),
        }
    }
}

/// A failed request: a machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorObject {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// What went wrong and, where possible, what to do about it.
    pub message: String,
    /// Extra structured detail (for example every validation error of a config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// Error codes. Clients must treat an unknown code like `internal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The message was not valid JSON.
    ParseError,
    /// Valid JSON, but not a request (missing id or method, wrong types).
    InvalidRequest,
    /// The method does not exist.
    UnknownMethod,
    /// The parameters do not fit the method.
    InvalidParams,
    /// The first message of a connection was not `hello`.
    HelloRequired,
    /// Wrong token.
    Unauthorized,
    /// The client speaks another protocol version.
    ProtocolMismatch,
    /// The message is larger than [`crate::MAX_MESSAGE_BYTES`].
    MessageTooLarge,
    /// No such stack, service or subscription.
    NotFound,
    /// The request conflicts with the current state (e.g. a service is being removed).
    Conflict,
    /// The configuration is invalid; `data` lists every problem.
    InvalidConfig,
    /// The service's backend is not available in this build or on this machine.
    UnsupportedBackend,
    /// A backend failed to start, stop or inspect a service.
    BackendError,
    /// The daemon could not persist its state (disk full, read-only...).
    StorageError,
    /// The operation did not finish in time.
    Timeout,
    /// A bug or an unexpected failure in the daemon.
    Internal,
}

/// Any message the daemon sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ServerMessage {
    /// A journaled event (has `event` and `seq`).
    Event(Event),
    /// A log line of a `service.logs` request with `follow` (has `log`).
    Log(LogMessage),
    /// Output of a running `service.exec` (has `output`).
    Output(OutputMessage),
    /// The response to a request (has `result` or `error`).
    Response(Response),
}

/// A followed log line; `id` is the `service.logs` request it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogMessage {
    /// The `service.logs` request this line answers.
    pub id: RequestId,
    /// The line.
    pub log: LogLine,
}

/// Output of a `service.exec` request, sent before its response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OutputMessage {
    /// The `service.exec` request this output belongs to.
    pub id: RequestId,
    /// The output chunk.
    pub output: ExecOutput,
}

/// Parses a client's message into a request, or the error response to send instead:
/// `parse_error` for text that is not JSON, `invalid_request` (with the id, when the
/// message had one) for JSON that is not a request.
pub fn parse_request(text: &str) -> Result<Request, Response> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Response::err(None, ErrorCode::ParseError, format!("invalid JSON: {e}")))?;
    let id = value.get("id").and_then(Value::as_u64).map(RequestId);
    serde_json::from_value(value).map_err(|e| {
        Response::err(
            id,
            ErrorCode::InvalidRequest,
            format!("not a request ({e}); expected {{\"id\": <number>, \"method\": \"...\", \"params\": {{...}}}}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check_round_trip(text: &str) {
        let parsed: ServerMessage = serde_json::from_str(text).unwrap();
        let back = serde_json::to_value(&parsed).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<Value>(text).unwrap(),
            "{parsed:?}"
        );
    }

    #[test]
    fn request_params_default_to_null_when_missing() {
        let r: Request = serde_json::from_str(r#"{"id":1,"method":"daemon.status"}"#).unwrap();
        assert_eq!(r.params, Value::Null);
        let r: Request =
            serde_json::from_str(r#"{"id":1,"method":"daemon.status","params":null}"#).unwrap();
        assert_eq!(r.params, Value::Null);
    }

    #[test]
    fn request_rejects_unknown_fields_and_missing_method() {
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"method":"x","extra":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"id":1}"#).is_err());
    }

    #[test]
    fn responses_round_trip() {
        check_round_trip(r#"{"id":1,"result":{"daemon":"harnessd 0.1.0","protocol":1}}"#);
        check_round_trip(
            r#"{"id":2,"error":{"code":"not_found","message":"no service named api"}}"#,
        );
        check_round_trip(r#"{"id":null,"error":{"code":"parse_error","message":"bad"}}"#);
        let r = Response::err(Some(RequestId(3)), ErrorCode::UnknownMethod, "nope");
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"id":3,"error":{"code":"unknown_method","message":"nope"}})
        );
    }

    #[test]
    fn pushed_messages_round_trip() {
        check_round_trip(
            r#"{"event":"service.state","seq":18,"time":"2026-11-23T10:00:00.000Z","data":{"stack":"shop","name":"api","from":"starting","to":"running","reason":null}}"#,
        );
        check_round_trip(
            r#"{"id":4,"log":{"stack":"shop","service":"api","offset":7,"time":"2026-11-23T10:00:00.000Z","stream":"stdout","line":"hello"}}"#,
        );
        check_round_trip(r#"{"id":5,"output":{"stream":"stderr","data":"oops\n"}}"#);
    }
}
