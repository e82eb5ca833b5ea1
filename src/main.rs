use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// multisite: run fleets of replicated tracker databases over several sites on Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "multisite", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the upgrade plan for a family: the ordered steps that take its client
    /// tiers and replicas to the target feature level, or why no safe plan exists.
    ///
    /// The input is a ReplicaFamily and its Replicas as `kubectl get -o yaml` prints
    /// them (a List, or several YAML documents), statuses included: the status says
    /// where each replica and client tier is now.
    ///
    /// Exit status: 0 when a plan exists (possibly empty), 3 when the plan is
    /// refused (the reason is printed), 1 when the input is invalid.
    #[command(
        after_help = "Examples:\n  multisite plan -f examples/staged-upgrade.yaml\n  kubectl get replicafamily/sampl replicas -n tracker -o yaml | multisite plan -f - -o json"
    )]
    Plan {
        /// File with the family and its replicas; `-` reads standard input.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: multisite::cmd::plan::Output,
        /// The family to plan for, when the input holds several.
        #[arg(long, value_name = "NAME")]
        family: Option<String>,
        /// Compatibility data (Tables 1 and 2) to use instead of the built-in tables.
        #[arg(long, value_name = "FILE", env = "MULTISITE_COMPATIBILITY")]
        compatibility: Option<PathBuf>,
    },
    /// Print the CustomResourceDefinitions of the product (or write them, one file each).
    Crd {
        /// Write one file per CRD into this directory instead of printing a YAML stream.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

/// Exit status of a refused plan.
const EXIT_REFUSED: u8 = 3;

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Plan {
            file,
            output,
            family,
            compatibility,
        } => {
            use multisite::cmd::plan;
            let compat = plan::load_compatibility(compatibility.as_deref())?;
            let (source, text) = plan::read_input(&file)?;
            let (fleet, outcome) = plan::compute(&compat, &source, &text, family.as_deref())?;
            match output {
                plan::Output::Table => print!("{}", plan::render_table(&compat, &fleet, &outcome)),
                plan::Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&plan::report(&fleet, &outcome))?
                ),
            }
            Ok(if outcome.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_REFUSED)
            })
        }
        Command::Crd { out_dir } => {
            match out_dir {
                Some(dir) => {
                    for path in multisite::cmd::crd::write_dir(&dir)? {
                        println!("wrote {path}");
                    }
                }
                None => print!("{}", multisite::cmd::crd::stream()?),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
