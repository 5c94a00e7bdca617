//! The `tilt` command line: run, resume, worker, report, model, check-config.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tilt::config::Config;
use tilt::run::{default_out, execute, prepare_run_dir};

#[derive(Parser)]
#[command(
    name = "tilt",
    version,
    about = "Fine-tune diffusion models toward a reward or a preference (VRPO, DF-DPO)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the stages a config lists, in order, in a fresh run directory.
    Run {
        /// A TOML config (see configs/).
        config: PathBuf,
        /// Run directory (default: runs/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override any config key: --set vrpo.labels=hard --set sampling.steps=20
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Continue a stopped run from its last checkpoint.
    Resume {
        run_dir: PathBuf,
        /// Override keys of the saved config (e.g. a larger vrpo.steps).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Run one role of a multi-process run that meets through Redis (VRPO: rollout, critic,
    /// learner; DF-DPO: distortion, learner).
    Worker {
        #[arg(long, value_enum)]
        role: tilt::algo::WorkerRole,
        #[arg(long)]
        config: PathBuf,
        /// Names the run: Redis keys are namespaced by it; every worker of the run passes the same.
        #[arg(long)]
        run_id: String,
        /// Names this worker among the run's workers of its role (run several of one role with
        /// different ids); a start under a name that started before counts as a restart.
        #[arg(long, default_value = "0")]
        id: String,
        /// The shared run directory (default: runs/<run-id>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Re-render the plots of a run and print its summary (or its progress so far).
    Report { run_dir: PathBuf },
    /// Compare tilt's CUDA kernels with their CPU reference and measure learner steps/s, CPU vs
    /// GPU (needs the `cuda` build and a GPU; scripts/gpu-check.sh runs it).
    GpuCheck {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// The JSON report.
        #[arg(long, default_value = "gpu-check.json")]
        out: PathBuf,
        /// Learner batch sizes (pairs per step).
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
        batches: Vec<usize>,
        /// Seconds of timed steps per device and batch size.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Seconds for the whole benchmark: a measurement whose predicted cost (the last batch's
        /// wall time scaled by the batch) exceeds what is left is skipped and reported as such.
        #[arg(long, default_value_t = 240.0)]
        budget: f64,
        /// Skip the CPU measurements.
        #[arg(long)]
        no_cpu: bool,
    },
    /// Inspect or run a diffusers-format model (docs/your-own-model.md).
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Validate a config and print it fully resolved.
    CheckConfig {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// The class, the config tilt understood and the parameter count; or the one-line refusal.
    Info { dir: PathBuf },
    /// One forward pass: `sample`, `timestep` and (class-conditional) `class_labels` in,
    /// `sample` out.
    Forward {
        dir: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A LoRA: pytorch_lora_weights.safetensors or the directory holding it.
        #[arg(long)]
        lora: Option<PathBuf>,
        /// "cpu", "cuda" or "cuda:N" (CUDA needs the `cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Write a copy of the model (or pipeline) directory with the LoRA folded into its weights.
    Merge {
        dir: PathBuf,
        #[arg(long)]
        lora: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

async fn main_inner(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Model { cmd } => match cmd {
            ModelCmd::Info { dir } => tilt::model::info(&dir)?,
            ModelCmd::Forward {
                dir,
                inputs,
                out,
                lora,
                device,
            } => tilt::model::forward(
                &dir,
                &inputs,
                &out,
                lora.as_deref(),
                &tilt::model::device(&device)?,
            )?,
            ModelCmd::Merge { dir, lora, out } => tilt::model::merge(&dir, &lora, &out)?,
        },
        Cmd::Worker {
            role,
            config,
            run_id,
            id,
            out,
            sets,
        } => {
            let cfg = Config::load(&config, &sets)?;
            let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&run_id));
            tilt::worker::run_worker(&cfg, role, &id, &run_id, &out).await?;
        }
        Cmd::GpuCheck {
            device,
            out,
            batches,
            seconds,
            budget,
            no_cpu,
        } => {
            // Tensor work off the async executor.
            tokio::task::spawn_blocking(move || {
                tilt::gpu_check::gpu_check(&device, &out, &batches, seconds, budget, !no_cpu)
            })
            .await??
        }
        Cmd::Report { run_dir } => tilt::report::report(&run_dir)?,
        Cmd::CheckConfig { config, sets } => {
            let cfg = Config::load(&config, &sets)?;
            print!("{}", cfg.to_toml()?);
        }
        Cmd::Run { config, out, sets } => {
            let cfg = Config::load(&config, &sets)?;
            let out = out.unwrap_or_else(|| default_out(&cfg));
            tilt::build::check_devices(&cfg)?;
            prepare_run_dir(&out, &cfg)?;
            execute(&cfg, &out).await?;
        }
        Cmd::Resume { run_dir, sets } => {
            let path = run_dir.join("config.toml");
            let cfg = Config::load(&path, &sets)
                .with_context(|| format!("{} is not a tilt run directory", run_dir.display()))?;
            tilt::build::check_devices(&cfg)?;
            if !sets.is_empty() {
                std::fs::write(&path, cfg.to_toml()?)?;
            }
            execute(&cfg, &run_dir).await?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tilt::alloc::tune();
    // Before the async runtime starts any thread.
    tilt::alloc::default_op_threads();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tilt: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tilt: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
