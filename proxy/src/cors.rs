//! A rule's CORS policy, compiled: the proxy answers the preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) of an allowed origin itself, and every response to a
//! request from an allowed origin — the upstream's, a rule's own answer or the proxy's error —
//! carries `Access-Control-Allow-Origin` so the page can read it (an error a page cannot read
//! shows up in the browser as a "CORS error" instead of the 503 it is). A request from another
//! origin is left alone, its preflight included. The model and its validation are in
//! [`weft_proto::cors`].

use std::sync::Arc;

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, HeaderMap, HeaderValue, ORIGIN,
    VARY,
};
use http::{Method, Request, Response, StatusCode};
use weft_proto::validate::Limits;

use crate::body::ProxyBody;
use crate::metrics::TargetLabels;
use crate::routing::{CompileError, Matcher};

#[derive(Debug)]
pub struct Cors {
    origins: Vec<Matcher>,
    /// `None`: not configured (header left out); `Some(None)`: `*`, echo what was asked.
    methods: Option<Option<HeaderValue>>,
    headers: Option<Option<HeaderValue>>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
    /// A preflight the proxy answers is counted under the route, with no service.
    labels: Arc<TargetLabels>,
}

/// What a request from an allowed origin gets: the preflight's answer, or the marks its
/// response will carry.
pub enum Outcome {
    /// With the labels it is counted under: the route's, with no service. (Boxed: rare, and
    /// the `None` every other request gets stays small.)
    Preflight(Box<Response<ProxyBody>>, Arc<TargetLabels>),
    Grant(Box<Grant>),
}

/// The allowed origin of a request, kept until its response is ready.
#[derive(Debug)]
pub struct Grant {
    policy: Arc<crate::resilience::call::RulePolicy>,
    origin: HeaderValue,
}

fn joined(list: &[String]) -> Result<Option<Option<HeaderValue>>, String> {
    if list.is_empty() {
        return Ok(None);
    }
    if list.iter().any(|s| s == "*") {
        return Ok(Some(None));
    }
    HeaderValue::from_str(&list.join(", "))
        .map(|v| Some(Some(v)))
        .map_err(|_| format!("{list:?} is not a header value"))
}

impl Cors {
    /// `at` is the policy's path in the configuration, for errors.
    pub fn compile(
        c: &weft_proto::cors::Cors,
        route: &str,
        limits: &Limits,
        at: &str,
    ) -> Result<Self, CompileError> {
        let list = |field: &str, list: &[String]| {
            joined(list).map_err(|reason| CompileError::Match {
                path: format!("{at}.{field}"),
                reason,
            })
        };
        Ok(Self {
            origins: c
                .allow_origins
                .iter()
                .map(|m| crate::routing::matcher(m, limits, &format!("{at}.allow_origins")))
                .collect::<Result<_, _>>()?,
            methods: list("allow_methods", &c.allow_methods)?,
            headers: list("allow_headers", &c.allow_headers)?,
            expose: list("expose_headers", &c.expose_headers)?
                .map(|v| v.unwrap_or(HeaderValue::from_static("*"))),
            max_age: c
                .max_age
                .map(|m| HeaderValue::from(m.as_duration().as_secs())),
            credentials: c.allow_credentials,
            labels: Arc::new(TargetLabels::new(route, "", "")),
        })
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.origins.iter().any(|m| m.matches(origin.as_bytes()))
    }

    /// `None` for a request without an allowed `Origin` (most requests: one header lookup).
    pub fn outcome<B>(
        policy: &Arc<crate::resilience::call::RulePolicy>,
        req: &Request<B>,
    ) -> Option<Outcome> {
        let cors = policy.cors.as_ref()?;
        let origin = req.headers().get(ORIGIN)?;
        if !cors.allows(origin) {
            return None;
        }
        let asked = req.headers().get(ACCESS_CONTROL_REQUEST_METHOD);
        if req.method() == Method::OPTIONS
            && let Some(asked) = asked
        {
            return Some(Outcome::Preflight(
                Box::new(cors.preflight(req, origin, asked)),
                cors.labels.clone(),
            ));
        }
        Some(Outcome::Grant(Box::new(Grant {
            policy: policy.clone(),
            origin: origin.clone(),
        })))
    }

    fn preflight<B>(
        &self,
        req: &Request<B>,
        origin: &HeaderValue,
        asked: &HeaderValue,
    ) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::OK;
        *resp.version_mut() = req.version();
        let h = resp.headers_mut();
        self.mark(h, origin.clone());
        match &self.methods {
            Some(Some(list)) => {
                h.insert(ACCESS_CONTROL_ALLOW_METHODS, list.clone());
            }
            Some(None) => {
                h.insert(ACCESS_CONTROL_ALLOW_METHODS, asked.clone());
            }
            None => {}
        }
        match (
            &self.headers,
            req.headers().get(ACCESS_CONTROL_REQUEST_HEADERS),
        ) {
            (Some(Some(list)), _) => {
                h.insert(ACCESS_CONTROL_ALLOW_HEADERS, list.clone());
            }
            (Some(None), Some(asked)) => {
                h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
            }
            _ => {}
        }
        if let Some(age) = &self.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, age.clone());
        }
        resp
    }

    /// The marks every answer to an allowed origin carries. The origin is echoed rather than
    /// `*` (which browsers refuse on requests with credentials), so caches must key on it.
    fn mark(&self, h: &mut HeaderMap, origin: HeaderValue) {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(VARY, HeaderValue::from_static("origin"));
        if self.credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

impl Grant {
    /// Marks a response (the upstream's, which may have its own CORS fields: the rule's win).
    pub fn apply(self, h: &mut HeaderMap) {
        let Some(cors) = &self.policy.cors else {
            return;
        };
        cors.mark(h, self.origin);
        if let Some(expose) = &cors.expose {
            h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::call::RulePolicy;
    use weft_proto::model::{Millis, StringMatch};

    fn policy(edit: impl FnOnce(&mut weft_proto::cors::Cors)) -> Arc<RulePolicy> {
        let mut c = weft_proto::cors::Cors {
            allow_origins: vec![
                StringMatch::exact("https://shop.example"),
                StringMatch {
                    regex: Some(r"https://[a-z]+\.shop\.example".into()),
                    ..StringMatch::default()
                },
            ],
            allow_methods: vec!["GET".into(), "PUT".into()],
            allow_headers: vec!["content-type".into(), "x-user".into()],
            expose_headers: vec!["x-request-id".into()],
            max_age: Some(Millis(90_500)),
            allow_credentials: false,
        };
        edit(&mut c);
        Arc::new(RulePolicy {
            cors: Some(Cors::compile(&c, "shop", &Limits::default(), "cors").unwrap()),
            ..RulePolicy::default()
        })
    }

    fn req(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/cart");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn preflight(p: &Arc<RulePolicy>, headers: &[(&str, &str)]) -> Option<Response<ProxyBody>> {
        match Cors::outcome(p, &req(Method::OPTIONS, headers))? {
            Outcome::Preflight(r, labels) => {
                assert_eq!(*labels, TargetLabels::new("shop", "", ""));
                Some(*r)
            }
            Outcome::Grant(_) => panic!("a preflight was granted instead of answered"),
        }
    }

    fn get(r: &Response<ProxyBody>, name: &str) -> Option<String> {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn an_allowed_origins_preflight_is_answered() {
        let p = policy(|_| {});
        let r = preflight(
            &p,
            &[
                ("origin", "https://eu.shop.example"),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-user"),
            ],
        )
        .unwrap();
        assert_eq!(r.status(), 200);
        let h = |n| get(&r, n);
        assert_eq!(
            h("access-control-allow-origin").as_deref(),
            Some("https://eu.shop.example")
        );
        assert_eq!(
            h("access-control-allow-methods").as_deref(),
            Some("GET, PUT")
        );
        assert_eq!(
            h("access-control-allow-headers").as_deref(),
            Some("content-type, x-user")
        );
        assert_eq!(h("access-control-max-age").as_deref(), Some("90"));
        assert_eq!(h("vary").as_deref(), Some("origin"));
        assert_eq!(h("access-control-allow-credentials"), None);
        assert_eq!(
            h("access-control-expose-headers"),
            None,
            "for responses only"
        );
    }

    #[test]
    fn wildcards_echo_what_the_browser_asked_for() {
        let p = policy(|c| {
            c.allow_methods = vec!["*".into()];
            c.allow_headers = vec!["*".into()];
            c.allow_credentials = true;
        });
        let r = preflight(
            &p,
            &[
                ("origin", "https://shop.example"),
                ("access-control-request-method", "DELETE"),
                ("access-control-request-headers", "x-a, x-b"),
            ],
        )
        .unwrap();
        assert_eq!(
            get(&r, "access-control-allow-methods").as_deref(),
            Some("DELETE")
        );
        assert_eq!(
            get(&r, "access-control-allow-headers").as_deref(),
            Some("x-a, x-b")
        );
        assert_eq!(
            get(&r, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
    }

    #[test]
    fn other_origins_and_plain_requests_are_left_alone() {
        let p = policy(|_| {});
        for headers in [
            // Not allowed: a look-alike host, another scheme, a suffix the regex does not allow.
            &[
                ("origin", "https://shop.example.evil"),
                ("access-control-request-method", "PUT"),
            ][..],
            &[
                ("origin", "http://shop.example"),
                ("access-control-request-method", "PUT"),
            ],
            &[
                ("origin", "https://a.b.shop.example"),
                ("access-control-request-method", "PUT"),
            ],
            // No Origin: not a cross-origin request.
            &[("access-control-request-method", "PUT")],
        ] {
            assert!(
                Cors::outcome(&p, &req(Method::OPTIONS, headers)).is_none(),
                "{headers:?}"
            );
        }
        assert!(
            Cors::outcome(
                &RulePolicy::default().into(),
                &req(
                    Method::OPTIONS,
                    &[
                        ("origin", "https://shop.example"),
                        ("access-control-request-method", "PUT")
                    ]
                )
            )
            .is_none(),
            "no policy"
        );
    }

    #[test]
    fn a_granted_response_is_marked_and_keeps_its_other_fields() {
        let p = policy(|c| c.allow_credentials = true);
        // An OPTIONS without Access-Control-Request-Method is an ordinary request.
        for method in [Method::GET, Method::OPTIONS] {
            let Some(Outcome::Grant(g)) =
                Cors::outcome(&p, &req(method, &[("origin", "https://shop.example")]))
            else {
                panic!("not granted");
            };
            let mut h = HeaderMap::new();
            h.insert(VARY, HeaderValue::from_static("accept-encoding"));
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            g.apply(&mut h);
            assert_eq!(h["access-control-allow-origin"], "https://shop.example");
            assert_eq!(h["access-control-expose-headers"], "x-request-id");
            assert_eq!(h["access-control-allow-credentials"], "true");
            let vary: Vec<_> = h.get_all(VARY).iter().collect();
            assert_eq!(vary, ["accept-encoding", "origin"]);
            assert!(h.get(ACCESS_CONTROL_ALLOW_METHODS).is_none());
        }
    }
}
