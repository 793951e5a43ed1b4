//! The browser client: the files under `web/`, embedded in the binary so
//! `nearby serve` needs nothing beside it. Debug builds read them from disk
//! at each request (rust-embed's default), so the page can be edited without
//! rebuilding.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(rust_embed::Embed)]
#[folder = "web/"]
struct Assets;

/// `GET /`: the page.
pub async fn index() -> Response {
    serve("index.html")
}

/// `GET /v1/web-config`: what the page needs before anyone logs in: its
/// street map's tiles (`null`: radar view only), the nearby radius it
/// draws, and whether this is `nearby demo`.
pub async fn config(State(st): State<Arc<AppState>>) -> Response {
    let cfg = &st.cfg;
    let map = (!cfg.tile_url.is_empty()).then(
        || serde_json::json!({ "tile_url": cfg.tile_url, "attribution": cfg.tile_attribution }),
    );
    let mut resp = Json(serde_json::json!({
        "map": map,
        "radius_m": cfg.radius_m,
        "demo": cfg.demo,
    }))
    .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /assets/{path}`: scripts, styles, images.
pub async fn asset(crate::rest::PathParam(path): crate::rest::PathParam) -> Response {
    serve(&path)
}

fn serve(path: &str) -> Response {
    let Some(file) = Assets::get(path) else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such asset").into_response();
    };
    // Release builds embed the files: hand out the static bytes, no copy.
    let body = match file.data {
        std::borrow::Cow::Borrowed(b) => axum::body::Body::from(b),
        std::borrow::Cow::Owned(v) => axum::body::Body::from(v),
    };
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime(path)));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The few types the page is made of; anything else is served as bytes.
fn mime(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_by_extension() {
        assert_eq!(mime("index.html"), "text/html; charset=utf-8");
        assert_eq!(mime("a/b/app.js"), "text/javascript; charset=utf-8");
        assert_eq!(mime("noext"), "application/octet-stream");
    }

    #[test]
    fn the_page_is_embedded() {
        let page = Assets::get("index.html").map(|f| f.data.into_owned());
        let page = String::from_utf8(page.unwrap_or_default()).unwrap_or_default();
        assert!(page.contains("<html"), "index.html missing or empty");
    }
}
