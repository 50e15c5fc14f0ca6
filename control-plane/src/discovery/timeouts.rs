//! HTTPRoute rule `timeouts` translated into a weft rule's: `request` → `timeout` (the whole
//! exchange, retries included), `backendRequest` → `retries.per_try_timeout` with no retries
//! added (`attempts: 0`: one try, bounded). Durations are GEP-2257 strings (`1h`, `2m30s`,
//! `500ms`); a zero duration means no timeout. What weft cannot take is left out with a warning.

use gateway_api::apis::standard::httproutes::HttpRouteRulesTimeouts;
use weft_proto::model::{Millis, RetryPolicy};

/// The rule's `timeout` and `retries` from its `timeouts`.
pub(super) fn timeouts(
    t: Option<&HttpRouteRulesTimeouts>,
    what: &str,
    warnings: &mut Vec<String>,
) -> (Option<Millis>, Option<RetryPolicy>) {
    let Some(t) = t else {
        return (None, None);
    };
    let mut read = |field: &str, value: &Option<String>| {
        let value = value.as_deref()?;
        match Millis::parse_gep2257(value) {
            Ok(ms) => (ms.0 > 0).then_some(ms),
            Err(reason) => {
                warnings.push(format!("{what}: timeouts.{field} left out: {reason}"));
                None
            }
        }
    };
    let request = read("request", &t.request);
    let mut backend = read("backendRequest", &t.backend_request);
    if let (Some(r), Some(b)) = (request, backend)
        && b > r
    {
        warnings.push(format!(
            "{what}: timeouts.backendRequest {b} left out: longer than request {r}"
        ));
        backend = None;
    }
    let retries = backend.map(|b| RetryPolicy {
        attempts: 0,
        per_try_timeout: Some(b),
        ..RetryPolicy::default()
    });
    (request, retries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_gep_2257_says() {
        for (s, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("2m30s", 150_000),
            ("1h1m1s1ms", 3_661_001),
            ("0s", 0),
        ] {
            assert_eq!(Millis::parse_gep2257(s), Ok(Millis(ms)), "{s}");
        }
        for s in [
            "",
            "10",
            "1.5s",
            "s",
            "123456s",
            "1d",
            "1s1s1s1s1s",
            "-1s",
            "1 s",
        ] {
            assert!(Millis::parse_gep2257(s).is_err(), "{s:?} was accepted");
        }
        assert!(
            Millis::parse_gep2257("99999h")
                .unwrap_err()
                .contains("49 days")
        );
    }

    #[test]
    fn request_and_backend_request_become_timeout_and_one_bounded_try() {
        let t = |request: Option<&str>, backend: Option<&str>| HttpRouteRulesTimeouts {
            request: request.map(str::to_owned),
            backend_request: backend.map(str::to_owned),
        };
        let mut warnings = Vec::new();
        let (timeout, retries) = timeouts(Some(&t(Some("10s"), Some("2s"))), "r", &mut warnings);
        assert_eq!(timeout, Some(Millis(10_000)));
        let retries = retries.unwrap();
        assert_eq!(
            (retries.attempts, retries.per_try_timeout),
            (0, Some(Millis(2000)))
        );
        // Zero disables; a backend timeout beyond the request's and a bad value are named.
        assert_eq!(
            timeouts(Some(&t(Some("0s"), None)), "r", &mut warnings),
            (None, None)
        );
        let (timeout, retries) = timeouts(Some(&t(Some("1s"), Some("5s"))), "r", &mut warnings);
        assert_eq!((timeout, retries), (Some(Millis(1000)), None));
        let (timeout, _) = timeouts(Some(&t(Some("soon"), None)), "r", &mut warnings);
        assert_eq!(timeout, None);
        assert_eq!(
            warnings,
            [
                "r: timeouts.backendRequest 5s left out: longer than request 1s",
                "r: timeouts.request left out: invalid duration \"soon\": expected e.g. 250ms, 2s, 1m30s or 1h",
            ]
        );
    }
}
