//! Images: found locally, pulled, built from a context directory, or imported from a
//! root filesystem tarball.

use std::path::{Path, PathBuf};

use bollard::errors::Error as BollardError;
use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use super::{engine_error, is_not_found, on_tokio, Engine};
use crate::DeployError;

/// Image label holding the hash of the build context or rootfs it was made from.
const LABEL_SOURCE: &str = "dev.harness.source";

/// When to pull an image from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Never: the image must be on the engine already (or built or imported).
    Never,
    /// Only when the engine does not have it (the default).
    #[default]
    Missing,
    /// Before every start.
    Always,
}

impl PullPolicy {
    /// From the config's `pull:` (validated there).
    pub fn from_config(value: Option<&str>) -> PullPolicy {
        match value {
            Some("never") => PullPolicy::Never,
            Some("always") => PullPolicy::Always,
            _ => PullPolicy::Missing,
        }
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// The engine's image store, or a registry by the pull policy.
    Registry(PullPolicy),
    /// Built from a context directory (rebuilt when the context changes).
    Build {
        /// The context directory.
        context: PathBuf,
        /// The Dockerfile, relative to the context.
        dockerfile: String,
    },
    /// Imported from a root filesystem tarball (again when the tarball changes).
    Rootfs(PathBuf),
}

/// `repo:tag` split as the engine wants it; a `:` before the last `/` is a registry
/// port, not a tag.
fn split_reference(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

/// Lines of progress from an engine stream, or the error it ends with.
async fn drain<T>(
    stream: impl Stream<Item = Result<T, BollardError>>,
    action: &str,
    image: &str,
    mut line: impl FnMut(&T) -> Result<Option<String>, String>,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<(), DeployError> {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let item = item.map_err(|e| engine_error(action, image, e))?;
        match line(&item) {
            Ok(Some(text)) if !text.trim().is_empty() => progress(text.trim().to_owned()),
            Ok(_) => {}
            Err(detail) => {
                return Err(DeployError::Docker {
                    action: format!("{action} {image}"),
                    detail,
                })
            }
        }
    }
    Ok(())
}

/// A hash of a build context (as tarred) or a rootfs tarball.
fn source_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tar_context(context: &Path) -> Result<Vec<u8>, DeployError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", context)
        .and_then(|()| builder.into_inner())
        .map_err(|source| DeployError::ReadFile {
            path: context.to_owned(),
            source,
        })
}

impl Engine {
    /// The id and the `dev.harness.source` label (empty when it has none) of a local
    /// image; `Ok(None)` when the image is missing.
    async fn local_image(&self, image: &str) -> Result<Option<(String, String)>, DeployError> {
        let docker = &self.docker;
        match on_tokio(docker.inspect_image(image)).await {
            Ok(info) => {
                let label = info
                    .config
                    .and_then(|c| c.labels)
                    .and_then(|l| l.get(LABEL_SOURCE).cloned())
                    .unwrap_or_default();
                Ok(Some((info.id.unwrap_or_default(), label)))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine_error("inspect image", image, e)),
        }
    }

    /// Whether the local `image` was made from the source with this hash.
    async fn made_from(&self, image: &str, hash: &str) -> Result<bool, DeployError> {
        let local = self.local_image(image).await?;
        Ok(local.is_some_and(|(_, label)| label == hash))
    }

    /// The id of a local image that must exist now.
    async fn image_id(&self, image: &str) -> Result<String, DeployError> {
        match self.local_image(image).await? {
            Some((id, _)) => Ok(id),
            None => Err(DeployError::Docker {
                action: format!("find image {image}"),
                detail: "the engine does not have it after making it".to_owned(),
            }),
        }
    }

    /// Makes sure `image` is on the engine, by `source`, and returns its id; progress
    /// lines (pull status, build output) go to `progress`.
    pub async fn ensure_image(
        &self,
        image: &str,
        source: &ImageSource,
        progress: &mut (dyn FnMut(String) + Send),
    ) -> Result<String, DeployError> {
        self.make_image(image, source, progress).await?;
        self.image_id(image).await
    }

    async fn make_image(
        &self,
        image: &str,
        source: &ImageSource,
        progress: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), DeployError> {
        match source {
            ImageSource::Registry(policy) => self.pull(image, *policy, progress).await,
            ImageSource::Build {
                context,
                dockerfile,
            } => {
                let context = context.clone();
                let tarball = smol::unblock(move || tar_context(&context)).await?;
                let hash = source_hash(&tarball);
                if self.made_from(image, &hash).await? {
                    return Ok(());
                }
                progress(format!("building {image}"));
                let options = BuildImageOptions {
                    dockerfile: dockerfile.clone(),
                    t: Some(image.to_owned()),
                    rm: true,
                    forcerm: true,
                    labels: Some([(LABEL_SOURCE.to_owned(), hash)].into()),
                    ..Default::default()
                };
                let docker = &self.docker;
                let stream =
                    docker.build_image(options, None, Some(bollard::body_full(tarball.into())));
                let line = |info: &bollard::models::BuildInfo| match &info.error_detail {
                    Some(e) => Err(e.message.clone().unwrap_or_default()),
                    None => Ok(info.stream.clone().or_else(|| info.status.clone())),
                };
                on_tokio(drain(stream, "build image", image, line, progress)).await
            }
            ImageSource::Rootfs(path) => {
                let read_path = path.clone();
                let tarball = smol::unblock(move || std::fs::read(&read_path))
                    .await
                    .map_err(|source| DeployError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                let hash = source_hash(&tarball);
                if self.made_from(image, &hash).await? {
                    return Ok(());
                }
                progress(format!("importing {image} from {}", path.display()));
                let (repo, tag) = split_reference(image);
                let options = CreateImageOptions {
                    from_src: Some("-".to_owned()),
                    repo: Some(repo.to_owned()),
                    tag: Some(tag.to_owned()),
                    changes: vec![format!("LABEL {LABEL_SOURCE}={hash}")],
                    ..Default::default()
                };
                let docker = &self.docker;
                let stream = docker.create_image(
                    Some(options),
                    Some(bollard::body_full(tarball.into())),
                    None,
                );
                on_tokio(drain(stream, "import image", image, create_line, progress)).await
            }
        }
    }

    async fn pull(
        &self,
        image: &str,
        policy: PullPolicy,
        progress: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), DeployError> {
        let present = self.local_image(image).await?.is_some();
        match (policy, present) {
            (PullPolicy::Never, true) | (PullPolicy::Missing, true) => return Ok(()),
            (PullPolicy::Never, false) => {
                return Err(DeployError::Docker {
                    action: format!("find image {image}"),
                    detail: "the engine does not have it and `pull: never` forbids pulling; build or import it first (or set `pull: missing`)".to_owned(),
                })
            }
            _ => {}
        }
        progress(format!("pulling {image}"));
        let (repo, tag) = split_reference(image);
        let options = CreateImageOptions {
            from_image: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            ..Default::default()
        };
        let docker = &self.docker;
        let stream = docker.create_image(Some(options), None, None);
        on_tokio(drain(stream, "pull image", image, create_line, progress)).await
    }
}

/// A progress line of a pull or import: "<layer>: <status> <progress>".
fn create_line(info: &bollard::models::CreateImageInfo) -> Result<Option<String>, String> {
    if let Some(e) = &info.error_detail {
        return Err(e.message.clone().unwrap_or_default());
    }
    Ok(info.status.as_ref().map(|status| match &info.id {
        Some(id) => format!("{id}: {status}"),
        None => status.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_at_the_tag_not_the_registry_port() {
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(split_reference("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(
            split_reference("127.0.0.1:1/nope"),
            ("127.0.0.1:1/nope", "latest")
        );
        assert_eq!(split_reference("reg:5000/a/b:v2"), ("reg:5000/a/b", "v2"));
    }
}
