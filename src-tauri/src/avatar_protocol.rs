//! `avatar://localhost/<character id>`: serves avatars from the database so
//! the gallery never ships image bytes through IPC.

use tauri::http::{Request, Response, StatusCode, header};
use tauri::{Manager, Runtime, UriSchemeContext, UriSchemeResponder};

use crate::Backend;

pub(crate) fn handle<R: Runtime>(
    ctx: UriSchemeContext<'_, R>,
    request: Request<Vec<u8>>,
    responder: UriSchemeResponder,
) {
    let backend = ctx.app_handle().state::<Backend>().get();
    let id = request.uri().path().trim_start_matches('/').parse::<i64>();
    tauri::async_runtime::spawn_blocking(move || {
        let found = match (backend, id) {
            (Ok(b), Ok(id)) => b.avatar(id).ok().flatten(),
            _ => None,
        };
        let response = match found {
            Some(avatar) => Response::builder()
                .header(header::CONTENT_TYPE, avatar.format().mime())
                // The URL carries a version, so a cached image is never stale.
                .header(header::CACHE_CONTROL, "max-age=31536000, immutable")
                .header("X-Content-Type-Options", "nosniff")
                .body(avatar.bytes().to_vec()),
            None => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Vec::new()),
        };
        responder.respond(response.unwrap_or_else(|_| Response::new(Vec::new())));
    });
}
