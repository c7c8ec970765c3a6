//! Files the gateway serves itself, embedded in the binary: the browser helper and the
//! demo page.
//!
//! - `GET /wsrelay.js`: the helper as a classic script (defines `window.WS4Redis`, the
//!   same API as ws4redis.js, no jQuery needed).
//! - `GET /wsrelay.mjs`: the same file as an ES module (`import WS4Redis from …`).
//! - `GET /`: the demo page, when `demo` is on (by default only with the embedded broker).
//!
//! Each answer carries an `ETag` (a hash of the content) and honours `If-None-Match`
//! with 304, so browsers revalidate cheaply after a gateway upgrade.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

const HELPER: &str = include_str!("../assets/wsrelay.js");
const MODULE_EXPORTS: &str = "\nexport default WS4Redis;\nexport { WS4Redis };\n";
const DEMO: &str = include_str!("../assets/demo.html");

/// A static file with its precomputed validator.
pub struct Asset {
    body: String,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: String, content_type: &'static str) -> Asset {
        let digest = Sha256::digest(body.as_bytes());
        let etag = format!(
            "\"{}\"",
            digest
                .iter()
                .take(12)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Asset {
            body,
            content_type,
            etag,
        }
    }

    fn respond(&self, req: &HttpRequest) -> HttpResponse {
        let matches = req
            .headers()
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim() == self.etag || t.trim() == "*")
            });
        let mut response = if matches {
            HttpResponse::NotModified()
        } else {
            HttpResponse::Ok()
        };
        response
            .insert_header((header::ETAG, self.etag.clone()))
            .insert_header((
                header::CACHE_CONTROL,
                "public, max-age=300, must-revalidate",
            ));
        if matches {
            return response.finish();
        }
        response
            .content_type(self.content_type)
            .body(self.body.clone())
    }
}

/// The embedded files, built once per process.
pub struct Assets {
    script: Asset,
    module: Asset,
    demo: Asset,
    /// Whether `/` serves the demo page (setting `demo`).
    demo_on: bool,
}

impl Assets {
    pub fn new(demo_on: bool) -> Self {
        Assets {
            script: Asset::new(HELPER.to_string(), "text/javascript; charset=utf-8"),
            module: Asset::new(
                format!("{HELPER}{MODULE_EXPORTS}"),
                "text/javascript; charset=utf-8",
            ),
            demo: Asset::new(DEMO.to_string(), "text/html; charset=utf-8"),
            demo_on,
        }
    }
}

/// Mounts the files; `assets` is shared by the workers.
pub fn configure(cfg: &mut web::ServiceConfig, assets: web::Data<Assets>) {
    cfg.app_data(assets)
        .service(web::resource("/wsrelay.js").get(script))
        .service(web::resource("/wsrelay.mjs").get(module))
        .service(web::resource("/").get(demo));
}

async fn script(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    assets.script.respond(&req)
}

async fn module(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    assets.module.respond(&req)
}

async fn demo(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    if !assets.demo_on {
        return HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("the demo page is off (setting `demo`)");
    }
    assets.demo.respond(&req)
}
