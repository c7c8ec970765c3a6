//! Files the gateway serves itself, embedded in the binary: the browser helper and the
//! demo page.
//!
//! - `GET /wsrelay.js`: the helper as a classic script (defines `window.WS4Redis`, the
//!   same API as ws4redis.js, no jQuery needed).
//! - `GET /wsrelay.mjs`: the same file as an ES module (`import WS4Redis from …`).
//! - `GET /wsrelay.d.ts`: its TypeScript declarations.
//! - `GET /`: the demo page, when `demo` is on (by default only with the embedded broker).
//! - `POST /demo/publish`: the demo page's "publish from the server" button, mounted
//!   only when `demo` is on. It takes the body of `POST /api/publish` and publishes
//!   through the same code ([`http::publish_body`]), without the bearer token, but only
//!   what the demo's access rule ([`Rule::demo`]) lets its sockets publish: on `demo/…`
//!   facilities, to everybody (broadcast) or to the caller's own session (its
//!   `sessionid` cookie, the one the page sets). Anything else is refused with 403 and
//!   the reason; so is an `Origin` the sockets would refuse.
//!
//! Each answer carries an `ETag` (a hash of the content) and honours `If-None-Match`
//! with 304, so browsers revalidate cheaply after a gateway upgrade.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use crate::config::DEFAULT_SESSION_COOKIE;
use crate::http::{self, HttpState, PublishRequest};
use crate::identity;
use crate::policy::{glob_match, Rule};

const HELPER: &str = include_str!("../assets/wsrelay.js");
const MODULE_EXPORTS: &str = "\nexport default WS4Redis;\nexport { WS4Redis };\n";
const DECLARATIONS: &str = include_str!("../assets/wsrelay.d.ts");
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
    declarations: Asset,
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
            declarations: Asset::new(
                DECLARATIONS.to_string(),
                "application/typescript; charset=utf-8",
            ),
            demo: Asset::new(DEMO.to_string(), "text/html; charset=utf-8"),
            demo_on,
        }
    }
}

/// Mounts the files, and the demo's publish route when the demo is on; `assets` is
/// shared by the workers.
pub fn configure(cfg: &mut web::ServiceConfig, assets: web::Data<Assets>) {
    let demo_on = assets.demo_on;
    cfg.app_data(assets)
        .service(web::resource("/wsrelay.js").get(script))
        .service(web::resource("/wsrelay.mjs").get(module))
        .service(web::resource("/wsrelay.d.ts").get(declarations))
        .service(web::resource("/").get(demo));
    if demo_on {
        cfg.service(web::resource("/demo/publish").post(demo_publish));
    }
}

async fn script(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    assets.script.respond(&req)
}

async fn module(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    assets.module.respond(&req)
}

async fn declarations(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    assets.declarations.respond(&req)
}

async fn demo(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    if !assets.demo_on {
        return HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("the demo page is off (setting `demo`)");
    }
    assets.demo.respond(&req)
}

/// `POST /demo/publish`: a publish request from the demo page (see the module's text).
async fn demo_publish(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<HttpState>,
) -> HttpResponse {
    let peer = req.peer_addr().map(|a| a.ip());
    if let Err(why) = state.handshaker.policy.check_origin(req.head(), peer) {
        return http::plain(StatusCode::FORBIDDEN, why);
    }
    let session = match identity::session_key(req.headers(), DEFAULT_SESSION_COOKIE) {
        Ok(session) => session,
        Err(e) => return http::plain(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let limit = http::publish_limit(state.max_message_size);
    http::publish_body(body, limit, &state, |request| {
        demo_may_publish(request, session.as_deref())
    })
    .await
}

/// Whether the demo page may make `request`, `session` being the caller's session key:
/// only what the demo's access rule lets its sockets publish.
fn demo_may_publish(request: &PublishRequest, session: Option<&str>) -> Result<(), String> {
    let rule = Rule::demo();
    if !glob_match(&rule.facility, &request.facility) {
        let facility: String = request.facility.chars().take(64).collect();
        return Err(format!(
            "the demo publishes only on {} facilities, not {facility:?}; \
             anything else goes through POST /api/publish",
            rule.facility
        ));
    }
    let audiences = &request.audiences;
    if !audiences.users.is_empty() || !audiences.groups.is_empty() {
        return Err(
            "the demo publishes only to everybody (broadcast) and to this \
                    browser's own session; users and groups go through POST /api/publish"
                .into(),
        );
    }
    for key in &audiences.sessions {
        match session {
            Some(own) if own == key => {}
            Some(_) => {
                return Err(format!(
                    "the demo publishes only to this browser's own session (its \
                     {DEFAULT_SESSION_COOKIE} cookie), not to another one"
                ))
            }
            None => {
                return Err(format!(
                    "no {DEFAULT_SESSION_COOKIE} cookie: the demo publishes to a session \
                     only from that session's browser (open the demo page first)"
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use actix_web::http::{header, StatusCode};
    use actix_web::{test, web, App};

    use super::{configure, Assets};

    #[actix_web::test]
    async fn the_declarations_are_served_beside_the_helper_and_revalidate() {
        let app = test::init_service(
            App::new().configure(|cfg| configure(cfg, web::Data::new(Assets::new(false)))),
        )
        .await;
        let req = test::TestRequest::get().uri("/wsrelay.d.ts").to_request();
        let res = test::call_service(&app, req).await;
        assert_eq!(res.status(), StatusCode::OK);
        let headers = res.headers().clone();
        assert_eq!(
            headers.get(header::CONTENT_TYPE).unwrap(),
            "application/typescript; charset=utf-8"
        );
        let etag = headers
            .get(header::ETAG)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let body = test::read_body(res).await;
        let text = std::str::from_utf8(&body).unwrap();
        for api in [
            "send_message(",
            "get_transport(",
            "transports?:",
            "shared?:",
            "export default WS4Redis;",
        ] {
            assert!(text.contains(api), "{api} is not declared");
        }

        let req = test::TestRequest::get()
            .uri("/wsrelay.d.ts")
            .insert_header((header::IF_NONE_MATCH, etag))
            .to_request();
        let res = test::call_service(&app, req).await;
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED);

        // The helper itself is still there, and names its declarations.
        let req = test::TestRequest::get().uri("/wsrelay.js").to_request();
        let body = test::read_body(test::call_service(&app, req).await).await;
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("/wsrelay.d.ts"));
    }
}
