//! Kubernetes service-account tokens as proof of identity. The injector mounts a projected
//! token with audience [`AUDIENCE`] into every pod; the proxy sends it with its CSR, and the
//! control plane asks the API server (`TokenReview`) who it belongs to. A token the API server
//! authenticates, for our audience, as `system:serviceaccount:<ns>:<sa>` proves that service
//! account. The API server does the cryptography and knows about revocation (a deleted pod or
//! service account invalidates its tokens): nothing here to keep in sync.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;

use crate::certify::{AuthError, WorkloadId};

/// The audience of the projected token the injector mounts (and the only one accepted), so a
/// token minted for another service cannot be replayed here.
pub const AUDIENCE: &str = "weft";
/// One review may take this long before the proxy is told to try again.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Reviews tokens with the API server of `--kubernetes` (RBAC: `create` on `tokenreviews`).
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenReviewer { .. }")
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    /// The service account `token` proves, as the API server says.
    pub async fn review(&self, token: &str) -> Result<WorkloadId, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.trim().to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer =
            tokio::time::timeout(TIMEOUT, self.api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    AuthError(format!(
                        "TokenReview: the API server did not answer within {TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| {
                    AuthError(format!(
                        "TokenReview: the API server could not review the token: {e}"
                    ))
                })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .map_or_else(String::new, |e| format!(": {e}"));
            return Err(AuthError(format!(
                "TokenReview: the API server did not authenticate the token{why}"
            )));
        }
        // The API server checked the audience; an answer that names others is not for us.
        if let Some(audiences) = &status.audiences
            && !audiences.iter().any(|a| a == AUDIENCE)
        {
            return Err(AuthError(format!(
                "TokenReview: the token is for {audiences:?}, not {AUDIENCE:?}"
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account(&username)
    }
}

/// `system:serviceaccount:<namespace>:<name>` → that service account; any other user (a
/// person, a node) proves no workload identity.
fn service_account(username: &str) -> Result<WorkloadId, AuthError> {
    let refuse = || {
        AuthError(format!(
            "TokenReview: {username:?} is not a service account (system:serviceaccount:<ns>:<name>)"
        ))
    };
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(refuse)?;
    let (namespace, name) = rest.split_once(':').ok_or_else(refuse)?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return Err(refuse());
    }
    Ok(WorkloadId {
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_account_users_are_workloads() {
        assert_eq!(
            service_account("system:serviceaccount:shop:cart").unwrap(),
            WorkloadId {
                namespace: "shop".into(),
                service_account: "cart".into()
            }
        );
        for user in [
            "alice",
            "system:node:worker-1",
            "system:serviceaccount:shop",
            "system:serviceaccount::cart",
            "system:serviceaccount:shop:a:b",
        ] {
            let err = service_account(user).unwrap_err().to_string();
            assert!(err.contains("is not a service account"), "{user}: {err}");
        }
    }
}
