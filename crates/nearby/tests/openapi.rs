//! `docs/openapi.json` and the router agree: every route the server declares
//! is documented, and every documented operation is served (answers with
//! something other than the unknown-route fallback).
mod common;

use common::{call, Server};
use serde_json::Value;

#[tokio::test]
async fn openapi_documents_exactly_the_served_routes() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/docs/openapi.json")).expect("read openapi.json"),
    )
    .expect("openapi.json is JSON");
    let paths = spec["paths"].as_object().expect("paths");

    // Routes as declared in the router's source.
    let router_src = std::fs::read_to_string(format!("{root}/crates/nearby-server/src/lib.rs"))
        .expect("read router");
    let declared: Vec<&str> = router_src
        .split(".route(")
        .skip(1)
        .filter_map(|s| s.trim_start().strip_prefix('"')?.split('"').next())
        // The browser page and its assets are not API.
        .filter(|r| *r != "/" && !r.starts_with("/assets/"))
        .collect();
    assert!(declared.len() >= 9, "{declared:?}");
    for route in &declared {
        assert!(
            paths.contains_key(*route),
            "route {route} is not in docs/openapi.json"
        );
    }

    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    for (path, item) in paths {
        assert!(
            declared.contains(&path.as_str()),
            "{path} is documented but not routed"
        );
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let url = format!(
                "{}{}",
                server.base,
                path.replace("{id}", "1").replace("{username}", "nobody")
            );
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = call(&http, m, &url, None, None).await;
            assert!(
                !(status == 404 && body["code"] == "not_found") && status != 405,
                "{method} {path} is documented but answered {status} {body}"
            );
            let documented = item[method]["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(status.as_str()),
                "{method} {path}: undocumented status {status}"
            );
        }
    }
}

/// `GET /v1/web-config` carries the tile settings as given, `map: null`
/// with an empty `--tile-url`, and a tile URL without its placeholders
/// stops the server at start-up with the setting named.
#[tokio::test]
async fn web_config_names_the_map_tiles_or_none() {
    let server = Server::start(&[]);
    let (status, body) = server.get("/v1/web-config", None).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(
        body["map"]["tile_url"],
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    );
    assert!(
        body["map"]["attribution"]
            .as_str()
            .is_some_and(|a| a.contains("OpenStreetMap")),
        "{body}"
    );
    assert_eq!(body["radius_m"], 8047.0);
    assert_eq!(body["demo"], false);

    let own = Server::start(&[
        "--tile-url",
        "https://tiles.example.org/{z}/{x}/{y}.png",
        "--tile-attribution",
        "example tiles",
        "--radius-m",
        "5000",
    ]);
    let (_, body) = own.get("/v1/web-config", None).await;
    assert_eq!(
        body["map"]["tile_url"],
        "https://tiles.example.org/{z}/{x}/{y}.png"
    );
    assert_eq!(body["map"]["attribution"], "example tiles");
    assert_eq!(body["radius_m"], 5000.0);

    let none = Server::start(&["--tile-url", ""]);
    let (_, body) = none.get("/v1/web-config", None).await;
    assert!(body["map"].is_null(), "{body}");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--tile-url", "https://tiles.example.org/tile.png"])
        .output()
        .expect("run nearby");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a bad tile URL");
    assert!(stderr.contains("tile_url"), "{stderr}");
}
