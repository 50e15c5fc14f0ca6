//! The answer of a rule that answers itself, compiled: a redirect (`Location` built from the
//! request's URL) or a fixed response. The model and its validation are in
//! [`weft_proto::answer`]; the rule's response header edits are applied by the caller.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, LOCATION};
use http::{Request, Response, StatusCode};
use weft_proto::model::Rule;

use crate::body::ProxyBody;
use crate::rewrite::PathEdit;

#[derive(Debug)]
pub enum Compiled {
    Redirect(Redirect),
    Direct { status: StatusCode, body: Bytes },
}

#[derive(Debug)]
pub struct Redirect {
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: PathEdit,
    code: StatusCode,
}

fn status(code: u16) -> Result<StatusCode, String> {
    StatusCode::from_u16(code).map_err(|_| format!("{code} is not an HTTP status"))
}

impl Compiled {
    /// The rule's answer, if it has one; an error names the field and the reason.
    pub fn compile(rule: &Rule) -> Result<Option<Self>, (&'static str, String)> {
        if let Some(r) = &rule.redirect {
            let path = PathEdit::new(rule, r.prefix.as_ref(), r.path.as_ref())
                .map_err(|e| ("redirect", e))?;
            return Ok(Some(Compiled::Redirect(Redirect {
                scheme: r.scheme.clone(),
                host: r.host.clone(),
                port: r.port,
                path,
                code: status(r.code_or_default()).map_err(|e| ("redirect.code", e))?,
            })));
        }
        let Some(d) = &rule.direct_response else {
            return Ok(None);
        };
        Ok(Some(Compiled::Direct {
            status: status(d.status).map_err(|e| ("direct_response.status", e))?,
            body: Bytes::from(d.body.clone().unwrap_or_default()),
        }))
    }

    pub fn respond<B>(&self, req: &Request<B>) -> Response<ProxyBody> {
        let mut resp = match self {
            Compiled::Redirect(r) => {
                let mut resp = Response::new(ProxyBody::empty());
                *resp.status_mut() = r.code;
                // Built from validated parts and the request's own URL: it is a header value;
                // if it somehow is not, the redirect goes out without a Location.
                if let Ok(v) = HeaderValue::try_from(r.location(req)) {
                    resp.headers_mut().insert(LOCATION, v);
                }
                resp
            }
            Compiled::Direct { status, body } => {
                let mut resp = Response::new(ProxyBody::text(body.clone()));
                *resp.status_mut() = *status;
                if !body.is_empty() {
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                }
                resp
            }
        };
        *resp.version_mut() = req.version();
        resp
    }
}

impl Redirect {
    /// The request's URL with the configured parts replaced. Without a configured port, a
    /// changed scheme takes its default port (as the Gateway API says), otherwise the request's
    /// port stays; a scheme's default port is never written.
    fn location<B>(&self, req: &Request<B>) -> String {
        let scheme = self
            .scheme
            .as_deref()
            .unwrap_or_else(|| req.uri().scheme_str().unwrap_or("http"));
        let (req_host, req_port) = crate::routing::split_port(crate::routing::authority(req));
        let host = self.host.as_deref().unwrap_or(req_host);
        let port = self
            .port
            .or(if self.scheme.is_some() {
                None
            } else {
                req_port
            })
            .filter(|&p| p != if scheme == "https" { 443 } else { 80 });
        let path = req.uri().path();
        let new_path = self.path.apply(path);
        // No host to write (an HTTP/1.0 request without Host, and none configured): a relative
        // reference, which clients resolve against the URL they asked for.
        let mut out = if host.is_empty() {
            String::new()
        } else {
            format!("{scheme}://{host}")
        };
        if let Some(p) = port.filter(|_| !host.is_empty()) {
            out.push(':');
            out.push_str(&p.to_string());
        }
        out.push_str(new_path.as_deref().unwrap_or(path));
        if let Some(q) = req.uri().query() {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::answer::{DirectResponse, Redirect as Model};
    use weft_proto::model::StringMatch;

    fn redirect(prefix_match: Option<&str>, r: Model) -> Compiled {
        let mut rule = Rule::default();
        rule.matches.path = prefix_match.map(StringMatch::prefix);
        rule.redirect = Some(r);
        Compiled::compile(&rule).unwrap().unwrap()
    }

    fn location(c: &Compiled, uri: &str, host: &str) -> (u16, String) {
        let req = Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .unwrap();
        let resp = c.respond(&req);
        let loc = resp.headers()[LOCATION].to_str().unwrap().to_owned();
        (resp.status().as_u16(), loc)
    }

    #[test]
    fn locations_replace_what_is_configured_and_keep_the_rest() {
        let c = redirect(
            Some("/old"),
            Model {
                prefix: Some("/new".into()),
                ..Model::default()
            },
        );
        assert_eq!(
            location(&c, "/old/a?x=1", "shop:8080"),
            (301, "http://shop:8080/new/a?x=1".into())
        );
        // A scheme change drops the request's port for the scheme's default.
        let c = redirect(
            None,
            Model {
                scheme: Some("https".into()),
                code: Some(308),
                ..Model::default()
            },
        );
        assert_eq!(
            location(&c, "/p", "shop:8080"),
            (308, "https://shop/p".into())
        );
        let c = redirect(
            None,
            Model {
                host: Some("new.example".into()),
                port: Some(8443),
                scheme: Some("https".into()),
                path: Some("/landing".into()),
                code: Some(302),
                ..Model::default()
            },
        );
        assert_eq!(
            location(&c, "/p?q", "[::1]:80"),
            (302, "https://new.example:8443/landing?q".into())
        );
        // The default port of the scheme is not written; IPv6 hosts keep their brackets.
        let c = redirect(
            None,
            Model {
                path: Some("/x".into()),
                ..Model::default()
            },
        );
        assert_eq!(
            location(&c, "/p", "[::1]:80"),
            (301, "http://[::1]/x".into())
        );
        let c = redirect(
            None,
            Model {
                port: Some(80),
                ..Model::default()
            },
        );
        assert_eq!(location(&c, "/p", "a:9"), (301, "http://a/p".into()));
        // Without a Host, a relative reference.
        let c = redirect(
            Some("/old"),
            Model {
                prefix: Some("/new".into()),
                ..Model::default()
            },
        );
        let req = Request::builder().uri("/old/a?b").body(()).unwrap();
        assert_eq!(c.respond(&req).headers()[LOCATION], "/new/a?b");
    }

    #[test]
    fn a_direct_response_has_its_status_body_and_type() {
        let mut rule = Rule {
            direct_response: Some(DirectResponse {
                status: 418,
                body: Some("short and stout\n".into()),
            }),
            ..Rule::default()
        };
        let c = Compiled::compile(&rule).unwrap().unwrap();
        let req = Request::get("/").body(()).unwrap();
        let resp = c.respond(&req);
        assert_eq!(resp.status(), 418);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        rule.direct_response = Some(DirectResponse {
            status: 204,
            body: None,
        });
        let resp = Compiled::compile(&rule).unwrap().unwrap().respond(&req);
        assert_eq!(resp.status(), 204);
        assert!(resp.headers().get(CONTENT_TYPE).is_none());
        assert!(Compiled::compile(&Rule::default()).unwrap().is_none());
    }
}
