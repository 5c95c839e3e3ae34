// The harness dashboard: one WebSocket to harnessd (same origin), authenticated with the
// one-time code from `harness ui` (then a session kept for reloads), a live table of
// services updated from events (no polling), a following log tail, and start / stop /
// restart buttons. Plain JavaScript, no build step.
"use strict";

const SESSION_KEY = "harness-session";
const services = new Map(); // "stack/name" -> ServiceInfo
let ws;
let nextId = 1;
const pending = new Map(); // request id -> {resolve, reject, onLog}
let logFollow = null; // {id, key}

function call(method, params, onLog) {
  const id = nextId++;
  ws.send(JSON.stringify({ id, method, params }));
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject, onLog }));
}

function setStatus(text, online) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("online", online);
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text ?? "-";
  if (cls) td.className = cls;
  return td;
}

function render() {
  const body = document.querySelector("#services tbody");
  body.replaceChildren();
  const keys = [...services.keys()].sort();
  document.getElementById("empty").hidden = keys.length > 0;
  for (const key of keys) {
    const s = services.get(key);
    const tr = document.createElement("tr");
    tr.dataset.service = key;
    tr.append(cell(s.stack));
    const name = cell(s.name, "name");
    name.title = "show the log";
    name.addEventListener("click", () => followLog(s.stack, s.name));
    tr.append(name);
    tr.append(cell(s.state, "state state-" + s.state));
    tr.append(cell(s.health, "health health-" + s.health));
    tr.append(cell(s.backend));
    tr.append(cell(s.address));
    tr.append(cell(String(s.restarts)));
    const actions = document.createElement("td");
    for (const verb of ["start", "stop", "restart"]) {
      const b = document.createElement("button");
      b.textContent = verb;
      b.dataset.action = verb;
      b.addEventListener("click", () => act(verb, s.stack, s.name, b));
      actions.append(b);
    }
    tr.append(actions);
    body.append(tr);
  }
}

async function act(verb, stack, name, button) {
  button.disabled = true;
  try {
    await call("service." + verb, { stack, names: [name] });
  } catch (e) {
    alert(`${verb} ${name}: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

async function refresh(stack, name) {
  try {
    const s = await call("service.get", { stack, name });
    services.set(`${s.stack}/${s.name}`, s);
  } catch (e) {
    services.delete(`${stack}/${name}`); // removed meanwhile
  }
  render();
}

function onEvent(e) {
  const d = e.data || {};
  const key = `${d.stack}/${d.name}`;
  switch (e.event) {
    case "service.state": {
      const s = services.get(key);
      if (s) { s.state = d.to; render(); }
      refresh(d.stack, d.name); // address, pid and restarts change with the state
      break;
    }
    case "service.health": {
      const s = services.get(key);
      if (s) { s.health = d.status; render(); }
      break;
    }
    case "service.registered":
      refresh(d.stack, d.name);
      break;
    case "service.removed":
      services.delete(key);
      render();
      break;
  }
}

async function followLog(stack, name) {
  if (logFollow && pending.has(logFollow.id)) {
    call("unsubscribe", { subscription: logFollow.id }).catch(() => {});
  }
  const pre = document.getElementById("log");
  pre.textContent = "";
  document.getElementById("log-panel").hidden = false;
  document.getElementById("log-title").textContent = `${stack}/${name}`;
  const append = (l) => {
    pre.textContent += `${l.time} ${l.stream === "stderr" ? "!" : "|"} ${l.line}\n`;
    pre.scrollTop = pre.scrollHeight;
  };
  const id = nextId; // the id `call` is about to use
  logFollow = { id, key: `${stack}/${name}` };
  const result = await call("service.logs", { stack, name, tail: 100, follow: true }, append);
  result.lines.forEach(append);
}

function connect() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const code = hash.get("code");
  if (code) history.replaceState(null, "", location.pathname); // one use only
  const token = code || sessionStorage.getItem(SESSION_KEY);
  if (!token) {
    setStatus("no login: run `harness ui` and open the link it prints", false);
    return;
  }
  ws = new WebSocket(`wss://${location.host}/`);
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.event) return onEvent(msg);
    const p = pending.get(msg.id);
    if (!p) return;
    if (msg.log) return p.onLog && p.onLog(msg.log);
    if (!p.onLog) pending.delete(msg.id);
    if (msg.error) p.reject(new Error(msg.error.message));
    else p.resolve(msg.result);
  };
  ws.onclose = () => {
    setStatus("offline", false);
    for (const p of pending.values()) p.reject(new Error("connection closed"));
    pending.clear();
    // Come back with the session (the daemon restarted, or the network changed).
    if (sessionStorage.getItem(SESSION_KEY)) setTimeout(connect, 1000);
  };
  ws.onopen = async () => {
    try {
      const hello = await call("hello", { token, protocol: 1, client: "dashboard" });
      if (hello.session) sessionStorage.setItem(SESSION_KEY, hello.session);
      document.getElementById("daemon").textContent = `${hello.daemon} (${hello.instance})`;
      await call("subscribe", { topics: ["service"] });
      services.clear();
      for (const s of await call("service.list", {})) services.set(`${s.stack}/${s.name}`, s);
      render();
      setStatus("live", true);
      if (logFollow) {
        const [stack, name] = logFollow.key.split("/");
        followLog(stack, name);
      }
    } catch (e) {
      sessionStorage.removeItem(SESSION_KEY);
      setStatus(e.message, false);
    }
  };
}

connect();
