//! Which program runs a container of a given image: the node agent and the embedded
//! cluster's process kubelet share this map.

use std::path::PathBuf;

/// Which program runs a container of a given image.
#[derive(Clone, Debug, Default)]
pub struct ImageMap {
    /// Images by exact reference (`repo:tag` as written in the pod) or by repository
    /// (without tag or digest).
    pub images: Vec<(String, PathBuf)>,
    /// The program for images whose repository ends in `multisite`; `None` maps none.
    pub multisite: Option<PathBuf>,
}

impl ImageMap {
    /// The default mapping: images whose repository ends in `multisite` run this executable.
    pub fn current_exe() -> Self {
        Self {
            images: Vec::new(),
            multisite: std::env::current_exe().ok(),
        }
    }

    /// Maps `image` (a full reference or a repository) to `program`.
    pub fn with(mut self, image: &str, program: impl Into<PathBuf>) -> Self {
        self.images.push((image.to_string(), program.into()));
        self
    }

    /// The program for `image`, if it has one.
    pub fn program_for(&self, image: &str) -> Option<PathBuf> {
        let repository = repository_of(image);
        let explicit = self
            .images
            .iter()
            .find(|(name, _)| name == image || name == repository)
            .map(|(_, program)| program.clone());
        explicit.or_else(|| {
            let last = repository.rsplit('/').next().unwrap_or(repository);
            if last.ends_with("multisite") {
                self.multisite.clone()
            } else {
                None
            }
        })
    }
}

/// The repository of an image reference: without `@digest` and `:tag` (a colon before the
/// last slash belongs to a registry's port).
pub fn repository_of(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}
