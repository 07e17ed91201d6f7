//! `fcgpu serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the KV-cache
//! decoder, with continuous batching ([`engine`]), tool calls parsed by the BFCL decoders
//! ([`output`]) and SSE streaming ([`stream`]). See docs/serve.md.

pub mod conn;
pub mod engine;
pub mod errors;
pub mod output;
pub mod prefix_cache;
pub mod routes;
pub mod stream;
pub mod types;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::model::kv_cache::KvPool;
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::rollout::chat::ChatFormat;

pub struct ServeConfig {
    pub addr: SocketAddr,
    pub model_name: String,
    pub max_batch: usize,
    /// Most KV positions held at once (running samples and the prefix cache).
    pub max_batch_tokens: usize,
    /// Most positions the prefix cache keeps (0: off).
    pub prefix_cache_tokens: usize,
    pub max_queue: usize,
    /// Render chats with the embedded task's compact prompt instead of the model's template.
    pub compact: bool,
    /// Positions per block of the paged KV cache.
    pub kv_block_size: usize,
    /// `--read-timeout` and `--shutdown-timeout`.
    pub timeouts: conn::Timeouts,
}

/// Serves `model` until Ctrl-C / SIGTERM, then lets in-flight requests finish (for at most
/// `--shutdown-timeout`) and returns.
/// `load` runs on the decode thread (the model stays there); it returns the model and its
/// tokenizer.
pub fn run<F>(cfg: ServeConfig, load: F) -> Result<()>
where
    F: FnOnce() -> Result<(Model, Tokenizer)> + Send + 'static,
{
    let (handle, jobs) = engine::queue(cfg.max_queue);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (compact, kv_block_size) = (cfg.compact, cfg.kv_block_size);
    let engine_cfg = engine::EngineConfig {
        max_batch: cfg.max_batch.max(1),
        max_batch_tokens: cfg.max_batch_tokens,
        prefix_cache_tokens: cfg.prefix_cache_tokens,
    };
    let stats = handle.stats.clone();
    let decode = std::thread::Builder::new().name("fcgpu-decode".into()).spawn(move || {
        let (mut model, tok) = match load() {
            Ok(x) => x,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        model.config.eos_token_ids = crate::rollout::chat_eos_ids(&model, Some(&tok));
        let tok = Arc::new(tok);
        let format = if compact { Ok(ChatFormat::Compact) } else { ChatFormat::for_model(&model) };
        let format = match format {
            Ok(f) => f,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        // The pool before the server reports ready: a bad --kv-block-size ends `serve` at start.
        let pool = match KvPool::new(model.kv_shape(), kv_block_size) {
            Ok(p) => p,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let ctx = model.config.max_position_embeddings;
        // No budget: room for a full batch of context-long samples (blocks are allocated as
        // they are used).
        let engine_cfg = engine::EngineConfig {
            max_batch_tokens: match engine_cfg.max_batch_tokens {
                0 => engine_cfg.max_batch.saturating_mul(ctx),
                n => n,
            },
            ..engine_cfg
        };
        let info = (
            format,
            ctx,
            model.config.vocab_size,
            pool.blocks_for(engine_cfg.max_batch_tokens).saturating_mul(pool.block_size()),
        );
        let _ = ready_tx.send(Ok((info, tok.clone())));
        engine::run(&model, &tok, jobs, engine_cfg, &pool, &stats);
    })?;
    let ((format, ctx, vocab, kv_positions), tok) =
        ready_rx.recv().context("the decode thread ended while loading")??;
    let state = Arc::new(routes::AppState {
        engine: handle,
        tok,
        format,
        model_name: cfg.model_name.clone(),
        ctx,
        vocab,
        kv_positions,
        max_queue: cfg.max_queue,
        created: routes::now(),
        next_id: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(cfg, state))?;
    // Blocking tasks (tokenizing) are bounded by the bytes-per-position check; do not wait
    // on one longer than this.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    // Every handle is gone with the runtime's tasks: the decode loop drains and ends.
    decode.join().map_err(|_| anyhow::anyhow!("the decode thread panicked"))?;
    eprintln!("fcgpu serve: stopped");
    Ok(())
}

async fn serve(cfg: ServeConfig, state: routes::Shared) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("fcgpu serve: cannot listen on {}", cfg.addr))?;
    // Tests and scripts read the bound address (port 0 picks a free one) from this line.
    eprintln!("fcgpu serve: model `{}` listening on http://{}", cfg.model_name, listener.local_addr()?);
    let t = cfg.timeouts;
    let dropped = conn::serve(listener, routes::router(state), t, shutdown(t.shutdown)).await;
    if dropped > 0 {
        eprintln!(
            "fcgpu serve: dropped {dropped} connection(s) still open after --shutdown-timeout {} s",
            t.shutdown.as_secs_f64()
        );
    }
    Ok(())
}

/// Ctrl-C or SIGTERM: stop accepting; in-flight requests then get `deadline` to finish.
async fn shutdown(deadline: std::time::Duration) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!(
        "fcgpu serve: shutting down; finishing in-flight requests (at most {} s)",
        deadline.as_secs_f64()
    );
}
