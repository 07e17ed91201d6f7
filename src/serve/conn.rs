//! The connections of `fcgpu serve`: the accept loop, the read timeouts, and the shutdown drain.
//!
//! Each connection is a hyper HTTP/1 connection with hyper's own header-read timeout
//! (`--read-timeout`): a client must send a request's head within it, whether the connection is
//! new or idle between keep-alive requests, so half-sent heads (slowloris) cannot hold
//! connections and file descriptors. The body then has the same time to arrive, and at most
//! [`MAX_BODY`] bytes. On shutdown the listener closes; a connection with no request in
//! progress (idle, or a head not yet complete) is closed at once, a body still arriving is
//! answered 503, and requests in flight get `--shutdown-timeout` to finish before their
//! connections are dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::errors::ApiError;

/// Largest request body read (as axum's default limit); a larger one is answered 413.
pub const MAX_BODY: usize = 2 << 20;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Time a client has to send a request's head, and then its body.
    pub read: Duration,
    /// Time requests in flight get to finish after SIGTERM / Ctrl-C.
    pub shutdown: Duration,
}

/// Serves `app` on `listener` until `signal`, then drains. Returns how many connections were
/// still open at the shutdown deadline (and dropped).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    t: Timeouts,
    signal: impl Future<Output = ()>,
) -> usize {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut signal = pin!(signal);
    let mut accept_failing = false;
    loop {
        tokio::select! {
            _ = &mut signal => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    accept_failing = false;
                    conns.spawn(connection(stream, app.clone(), t.read, stop_rx.clone()));
                }
                Err(e) => {
                    if !accept_failing {
                        eprintln!("fcgpu serve: cannot accept a connection ({e}); retrying");
                    }
                    accept_failing = true;
                    // Out of file descriptors (EMFILE) stays so until a connection closes: wait
                    // a little rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(t.shutdown, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_ok() {
        return 0;
    }
    let left = conns.len();
    conns.shutdown().await;
    left
}

/// Requests of a connection in progress: from a complete head until the response body is gone.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender means the server is past its drain: stopped as well.
    let _ = stop.wait_for(|s| *s).await;
}

async fn connection(stream: TcpStream, app: Router, read: Duration, mut stop: watch::Receiver<bool>) {
    let busy = Arc::new(AtomicUsize::new(0));
    let service = {
        let (busy, stop) = (busy.clone(), stop.clone());
        hyper::service::service_fn(move |req| {
            let guard = Busy::new(&busy);
            let (app, stop) = (app.clone(), stop.clone());
            async move { Ok::<_, Infallible>(handle(app, req, read, stop, guard).await) }
        })
    };
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(read);
    let mut conn = pin!(http.serve_connection(TokioIo::new(stream), service));
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopped(&mut stop) => {}
    }
    if busy.load(Ordering::SeqCst) == 0 {
        return; // no request in progress: a half-sent head or an idle connection closes now
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Reads the body (bounded in size and time, cut by shutdown), runs the router, and makes any
/// error answer an OpenAI error object. `guard` lives as long as the response body.
async fn handle(
    mut app: Router,
    req: Request<Incoming>,
    read: Duration,
    mut stop: watch::Receiver<bool>,
    guard: Busy,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let (parts, body) = req.into_parts();
    // A declared length over the limit is refused before reading any of it.
    if hyper::body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
        return too_large();
    }
    let collected = tokio::select! {
        r = tokio::time::timeout(read, Limited::new(body, MAX_BODY).collect()) => r,
        _ = stopped(&mut stop) => {
            return ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "The server is shutting down; the request body was not complete").into_response();
        }
    };
    let bytes = match collected {
        Err(_) => {
            let msg =
                format!("The request body did not arrive within {} s (--read-timeout)", read.as_secs_f64());
            return ApiError::status(StatusCode::REQUEST_TIMEOUT, msg).into_response();
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(e)) => {
            return ApiError::status(
                StatusCode::BAD_REQUEST,
                format!("The request body could not be read: {e}"),
            )
            .into_response()
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let req = Request::from_parts(parts, Body::from(bytes));
    let res = match tower_service::Service::call(&mut app, req).await {
        Ok(r) => r,
        Err(e) => match e {},
    };
    let res = as_error_object(&method, &path, res);
    res.map(|b| {
        Body::new(b.map_frame(move |f| {
            let _keep = &guard;
            f
        }))
    })
}

fn too_large() -> Response {
    let msg = format!("The request body is larger than {MAX_BODY} bytes");
    ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, msg).into_response()
}

/// An error answer that is not JSON (axum's own 405, for one) as an OpenAI error object with
/// the same status and headers (`Allow` stays).
fn as_error_object(method: &Method, path: &str, res: Response) -> Response {
    let status = res.status();
    let json = res.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let msg = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path} (see the Allow header)"),
        _ => format!("{} ({method} {path})", status.canonical_reason().unwrap_or("error")),
    };
    let (mut parts, _) = res.into_parts();
    parts.headers.remove(CONTENT_TYPE);
    parts.headers.remove(CONTENT_LENGTH);
    let (fresh, body) = ApiError::status(status, msg).into_response().into_parts();
    parts.headers.extend(fresh.headers);
    Response::from_parts(parts, body)
}
