//! `multisite crd`: prints or writes the CRDs.

use crate::api;
use std::path::{Path, PathBuf};

/// The flags of `multisite crd` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct CrdArgs {
    /// Write one file per CRD into this directory instead of printing a YAML stream.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `multisite crd`: prints the CRDs, or writes them and prints the files written.
pub fn run(args: &CrdArgs) -> Result<(), CrdError> {
    match &args.out_dir {
        Some(dir) => {
            for path in write_dir(dir)? {
                println!("wrote {path}");
            }
        }
        None => print!("{}", stream()?),
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("cannot render CRD {name} as YAML: {source}")]
    Render {
        name: String,
        #[source]
        source: serde_saphyr::SerializeError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Every CRD as (file name, YAML text).
pub fn rendered() -> Result<Vec<(String, String)>, CrdError> {
    api::crds()
        .iter()
        .map(|crd| {
            let text = api::crd_yaml(crd).map_err(|source| CrdError::Render {
                name: crd.metadata.name.clone().unwrap_or_default(),
                source,
            })?;
            Ok((api::crd_file_name(crd), text))
        })
        .collect()
}

/// All CRDs as one multi-document YAML stream.
pub fn stream() -> Result<String, CrdError> {
    Ok(rendered()?
        .into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join(""))
}

/// Writes one file per CRD into `dir` (created if missing).
pub fn write_dir(dir: &Path) -> Result<Vec<String>, CrdError> {
    std::fs::create_dir_all(dir).map_err(|source| CrdError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, text) in rendered()? {
        let path = dir.join(&name);
        std::fs::write(&path, text).map_err(|source| CrdError::Write {
            path: path.display().to_string(),
            source,
        })?;
        written.push(path.display().to_string());
    }
    Ok(written)
}
