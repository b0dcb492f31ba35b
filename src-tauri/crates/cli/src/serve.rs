//! `serve`: Dramatis's engine as a local API for other front-ends.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use dramatis_core::Dramatis;
use dramatis_server::ServerConfig;

/// `dramatis-cli serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// The model: an installed model's name or API id, or a .gguf / Hugging Face
    /// folder (registered first if new). Default: the app's default model.
    #[arg(long)]
    model: Option<String>,
    /// An adapter trained on that model (its name), or a PEFT folder (registered).
    #[arg(long)]
    adapter: Option<String>,
    /// The port (KoboldCpp's 5001 by default, so front-ends find it).
    #[arg(long, default_value_t = 5001)]
    port: u16,
    /// The address to listen on; 0.0.0.0 lets other devices on the network in.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, env = "DRAMATIS_API_KEY")]
    api_key: Option<String>,
    /// A browser origin allowed to call (CORS); repeat for more.
    #[arg(long = "cors")]
    cors: Vec<String>,
}

/// Serves until Ctrl-C.
pub fn run(a: ServeArgs, cancel: &AtomicBool) -> Result<()> {
    let app = Arc::new(Dramatis::open_default().context("cannot open Dramatis's data folder")?);
    // A model id that names an adapter too (`phi-2+kestrel`) brings it along.
    let mut named_adapter = None;
    let model = match &a.model {
        None => None,
        Some(m) if Path::new(m).exists() => {
            let path = Path::new(m).canonicalize()?;
            let known = app.list_models()?.into_iter().find(|x| {
                Path::new(&x.path).canonicalize().ok().as_deref() == Some(path.as_path())
            });
            Some(match known {
                Some(x) => x,
                None => app.import_model(&path)?,
            })
        }
        Some(m) => {
            // An API id, or a model's display name ("Phi-2 Q4_K_M").
            let wanted = app.resolve_api_model(Some(m))?;
            named_adapter = wanted.adapter_id;
            Some(app.model(wanted.model_id)?)
        }
    };
    let model_id = match &model {
        Some(m) => m.id,
        None => {
            app.resolve_api_model(None)
                .context("no model is installed: pass --model FILE")?
                .model_id
        }
    };
    let adapter_id = match &a.adapter {
        None => named_adapter,
        Some(p) if Path::new(p).is_dir() => Some(app.register_adapter(Path::new(p), model_id)?),
        Some(name) => {
            let all = app.api_models()?;
            let found = all.iter().find(|m| {
                m.model_id == model_id
                    && m.adapter_id.is_some()
                    && m.id.ends_with(&format!("+{}", name.to_ascii_lowercase()))
            });
            match found {
                Some(m) => m.adapter_id,
                None => bail!(
                    "no adapter \"{name}\" was trained on this model; pass a PEFT folder instead"
                ),
            }
        }
    };
    let default = app
        .api_models()?
        .into_iter()
        .find(|m| m.model_id == model_id && m.adapter_id == adapter_id)
        .map(|m| m.id);
    let cfg = ServerConfig {
        addr: SocketAddr::new(a.host, a.port),
        api_key: a.api_key.clone(),
        cors_origins: a.cors.clone(),
        default_model: default.clone(),
        ..ServerConfig::local(a.port)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    rt.block_on(async {
        let server = dramatis_server::start(app.clone(), cfg)
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        // One line a script can wait for, with the real address.
        println!("listening on http://{}", server.addr);
        eprintln!(
            "model {}; OpenAI-compatible at http://{addr}/v1, KoboldCpp at http://{addr}; Ctrl-C stops",
            default.as_deref().unwrap_or("(default)"),
            addr = server.addr,
        );
        while !cancel.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("stopping after {} requests", server.requests());
        server.stop().await;
        anyhow::Ok(())
    })
}
