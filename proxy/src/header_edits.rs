//! A rule's header edits, compiled: names and values parsed once when the routing table is
//! built, then applied to the request the proxy forwards and to the upstream's response (not
//! to answers the proxy makes itself, which carry `x-weft-reason` instead). The model and its
//! validation are in [`weft_proto::headers`].

use http::header::{HeaderMap, HeaderName, HeaderValue};
use weft_proto::headers::{HeaderEdits, HeaderRules};

/// Edits on one message, in the order they apply.
#[derive(Debug, Default)]
pub struct Edits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl Edits {
    fn compile(e: &HeaderEdits) -> Result<Self, String> {
        let name = |n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a field name"))
        };
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .map(|(n, v)| {
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| format!("the value of {n} is not a field value"))?;
                    Ok((name(n)?, value))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Self {
            remove: e.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
            set: pairs(&e.set)?,
            add: pairs(&e.add)?,
        })
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A rule's edits to the request and to the response.
#[derive(Debug, Default)]
pub struct Compiled {
    pub request: Edits,
    pub response: Edits,
}

impl Compiled {
    pub fn compile(rules: &HeaderRules) -> Result<Self, String> {
        Ok(Self {
            request: Edits::compile(&rules.request)?,
            response: Edits::compile(&rules.response)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_then_set_then_add() {
        let mut rules = HeaderRules::default();
        rules.request.remove = vec!["x-debug".into()];
        rules.request.set.insert("X-Env".into(), "prod".into());
        rules.request.add.insert("x-via".into(), "weft".into());
        let c = Compiled::compile(&rules).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-debug", HeaderValue::from_static("1"));
        h.append("x-env", HeaderValue::from_static("dev"));
        h.append("x-env", HeaderValue::from_static("test"));
        h.insert("x-via", HeaderValue::from_static("client-proxy"));
        c.request.apply(&mut h);
        assert!(h.get("x-debug").is_none());
        assert_eq!(h.get_all("x-env").iter().collect::<Vec<_>>(), ["prod"]);
        assert_eq!(
            h.get_all("x-via").iter().collect::<Vec<_>>(),
            ["client-proxy", "weft"]
        );
        // The response side is separate.
        let mut r = HeaderMap::new();
        r.insert("x-debug", HeaderValue::from_static("1"));
        c.response.apply(&mut r);
        assert!(r.get("x-debug").is_some());
    }
}
