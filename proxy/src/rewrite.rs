//! A rule's URL rewrite, compiled: the path and host the upstream sees, applied once the
//! request is routed (so retries and mirror copies carry them). The model and its validation
//! are in [`weft_proto::rewrite`].

use http::Request;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use weft_proto::model::Rule;

/// A path change: of the prefix the rule matched, or of the whole path. Shared with redirects.
#[derive(Debug)]
pub(crate) enum PathEdit {
    Keep,
    /// The rule's matched prefix, and what replaces it.
    Prefix {
        matched: String,
        with: String,
    },
    Full(String),
}

impl PathEdit {
    pub(crate) fn new(
        rule: &Rule,
        prefix: Option<&String>,
        full: Option<&String>,
    ) -> Result<Self, String> {
        Ok(match (prefix, full) {
            (Some(with), _) => PathEdit::Prefix {
                matched: rule
                    .matches
                    .path
                    .as_ref()
                    .and_then(|m| m.prefix.clone())
                    .ok_or("replacing the matched prefix needs a path prefix match")?,
                with: with.clone(),
            },
            (None, Some(full)) => PathEdit::Full(full.clone()),
            (None, None) => PathEdit::Keep,
        })
    }

    /// The new path, when it changes.
    pub(crate) fn apply(&self, path: &str) -> Option<String> {
        match self {
            PathEdit::Keep => None,
            PathEdit::Full(full) => Some(full.clone()),
            PathEdit::Prefix { matched, with } => {
                let rest = path.strip_prefix(matched.as_str())?;
                // `/api` → `/`: `/api/x` becomes `/x`, not `//x`.
                let joined = format!("{}{rest}", with.trim_end_matches('/'));
                Some(if joined.is_empty() {
                    "/".into()
                } else {
                    joined
                })
            }
        }
    }
}

#[derive(Debug)]
pub struct Compiled {
    path: PathEdit,
    host: Option<(HeaderValue, Authority)>,
}

impl Compiled {
    pub fn compile(rule: &Rule) -> Result<Option<Self>, String> {
        let Some(r) = &rule.rewrite else {
            return Ok(None);
        };
        let path = PathEdit::new(rule, r.prefix.as_ref(), r.path.as_ref())?;
        let host = r
            .host
            .as_deref()
            .map(|h| {
                Ok::<_, String>((
                    HeaderValue::from_str(h).map_err(|_| format!("{h:?} is not a host"))?,
                    h.parse::<Authority>()
                        .map_err(|_| format!("{h:?} is not a host"))?,
                ))
            })
            .transpose()?;
        Ok(Some(Self { path, host }))
    }

    pub fn apply<B>(&self, req: &mut Request<B>) {
        let path = self.path.apply(req.uri().path());
        let mut authority = None;
        if let Some((value, new)) = &self.host {
            req.headers_mut().insert(header::HOST, value.clone());
            // Origin-form URIs (HTTP/1.1) carry no authority: Host alone says it.
            if req.uri().authority().is_some() {
                authority = Some(new.clone());
            }
        }
        if path.is_none() && authority.is_none() {
            return;
        }
        // One rebuild of the URI for both changes.
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        if let Some(path) = path {
            let pq = match parts.path_and_query.as_ref().and_then(|pq| pq.query()) {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            // Validated as URL path characters: this conversion cannot fail.
            parts.path_and_query = PathAndQuery::try_from(pq).ok().or(parts.path_and_query);
        }
        if authority.is_some() {
            parts.authority = authority;
        }
        // Cannot fail: the parts keep the original's shape (scheme and authority both there
        // or both absent, a path always there).
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::model::StringMatch;
    use weft_proto::rewrite::Rewrite;

    fn rule(prefix_match: Option<&str>, r: Rewrite) -> Rule {
        let mut rule = Rule::default();
        rule.matches.path = prefix_match.map(StringMatch::prefix);
        rule.rewrite = Some(r);
        rule
    }

    fn rewritten(c: &Compiled, uri: &str) -> (String, Option<String>) {
        let mut req = Request::builder().uri(uri).body(()).unwrap();
        c.apply(&mut req);
        let host = req
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().unwrap().to_owned());
        (req.uri().to_string(), host)
    }

    #[test]
    fn prefix_path_and_host() {
        let prefix = |with: &str| Rewrite {
            prefix: Some(with.into()),
            ..Rewrite::default()
        };
        let c = Compiled::compile(&rule(Some("/api"), prefix("/v1")))
            .unwrap()
            .unwrap();
        assert_eq!(rewritten(&c, "/api/x?q=1").0, "/v1/x?q=1");
        assert_eq!(rewritten(&c, "/api").0, "/v1");
        let c = Compiled::compile(&rule(Some("/api"), prefix("/")))
            .unwrap()
            .unwrap();
        assert_eq!(rewritten(&c, "/api/x").0, "/x");
        assert_eq!(rewritten(&c, "/api").0, "/");
        let full = Rewrite {
            path: Some("/health".into()),
            host: Some("internal:8080".into()),
            ..Rewrite::default()
        };
        let c = Compiled::compile(&rule(None, full)).unwrap().unwrap();
        assert_eq!(
            rewritten(&c, "/anything?x=y"),
            ("/health?x=y".into(), Some("internal:8080".into()))
        );
        // An absolute URI (HTTP/2's :authority) gets the new authority too.
        assert_eq!(
            rewritten(&c, "http://reviews/a").0,
            "http://internal:8080/health"
        );
    }
}
