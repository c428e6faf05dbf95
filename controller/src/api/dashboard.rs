//! The dashboard: a page at `/` and its files under `/ui/`, compiled into
//! the binary from `controller/dashboard/` (no build step, nothing fetched
//! from elsewhere: it works offline on the LAN).
//!
//! These files are open, like the health endpoints: they hold no fleet data.
//! Everything the page shows it reads from the API with the token the
//! operator types in, so a visitor without a token sees a sign-in form and
//! nothing else. Every answer forbids framing and inline script (a strict
//! `Content-Security-Policy`: the page's own files and its own API, nothing
//! else) and is revalidated by its `ETag` on each load, so an upgraded
//! controller serves its new page at once.

use super::AppState;
use super::extract::ApiPath;
use super::problem::Problem;
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::LazyLock;

/// One file of the dashboard.
struct Asset {
    /// The name under `/ui/` (`index.html` is served at `/`).
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../../dashboard/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the dashboard has.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", JS),
    asset!("model.js", JS),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
];

/// The page may load only its own files and call only its own API.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Each asset's `ETag`: a digest of its content, quoted (same order as
/// [`ASSETS`]).
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let digest = kiwi_security::digest::sha256_hex(a.body);
            HeaderValue::from_str(&format!("\"{}\"", &digest[..32]))
                .expect("a hex digest is a valid header value")
        })
        .collect()
});

/// The dashboard's route templates.
pub(super) const ROUTES: [&str; 2] = ["/", "/ui/{file}"];

/// The dashboard's routes: `/` and `/ui/{file}`, open (see the module
/// documentation).
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route(ROUTES[0], get(index))
        .route(ROUTES[1], get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers).unwrap_or_else(|p| p.into_response())
}

async fn file(ApiPath(name): ApiPath<String>, headers: HeaderMap) -> Response {
    serve(&name, &headers).unwrap_or_else(|p| p.into_response())
}

fn serve(name: &str, request: &HeaderMap) -> Result<Response, Problem> {
    let (i, asset) = ASSETS
        .iter()
        .enumerate()
        .find(|(_, a)| a.name == name)
        .ok_or_else(|| Problem::not_found(format!("the dashboard has no file {name:?}")))?;
    let etag = &ETAGS[i];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == etag)
        });
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ),
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    Ok(if fresh {
        (StatusCode::NOT_MODIFIED, headers).into_response()
    } else {
        (headers, asset.body).into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(name: &str, if_none_match: Option<&str>) -> Result<Response, Problem> {
        let mut h = HeaderMap::new();
        if let Some(v) = if_none_match {
            h.insert(header::IF_NONE_MATCH, v.parse().unwrap());
        }
        serve(name, &h)
    }

    #[test]
    fn every_file_is_served_with_its_type_and_the_policy() {
        for a in ASSETS {
            let r = get(a.name, None).unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{}", a.name);
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], a.content_type);
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
            assert!(!a.body.is_empty(), "{}", a.name);
        }
    }

    #[test]
    fn a_known_etag_is_not_modified_and_another_is_served() {
        let etag = get("app.js", None).unwrap().headers()[header::ETAG].clone();
        let etag = etag.to_str().unwrap();
        let again = get("app.js", Some(etag)).unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let weak = get("app.js", Some(&format!("\"x\", W/{etag}"))).unwrap();
        assert_eq!(weak.status(), StatusCode::NOT_MODIFIED);
        let other = get("app.js", Some("\"0123\"")).unwrap();
        assert_eq!(other.status(), StatusCode::OK);
        // Each file has its own.
        let css = get("style.css", None).unwrap().headers()[header::ETAG].clone();
        assert_ne!(css, etag);
    }

    #[test]
    fn an_unknown_file_is_a_problem_not_a_guess() {
        for name in ["nope.js", "../Cargo.toml", "", "index.html/"] {
            let p = get(name, None).unwrap_err();
            assert_eq!(p.into_response().status(), StatusCode::NOT_FOUND, "{name}");
        }
    }

    /// The page loads no script but its own files and writes no data into
    /// markup: the policy forbids inline script, and the code never uses
    /// `innerHTML` (everything shown is set as text).
    #[test]
    fn the_page_runs_only_its_own_script_and_sets_data_as_text() {
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(index.contains(r#"<script type="module" src="/ui/app.js"></script>"#));
        assert!(!index.contains("<script>"), "inline script");
        assert!(!index.contains(" style="), "inline style");
        for a in ASSETS.iter().filter(|a| a.content_type == JS) {
            let text = std::str::from_utf8(a.body).unwrap();
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "eval(",
                "document.write",
            ] {
                assert!(!text.contains(banned), "{} uses {banned}", a.name);
            }
        }
    }
}
