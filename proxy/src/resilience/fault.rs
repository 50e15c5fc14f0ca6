//! Fault injection for chaos tests: delay and/or abort a percentage of a rule's requests
//! (reason `fault_injected`).

use std::time::Duration;

use weft_proto::policy::Fault;

use super::ResilienceError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultConfig {
    pub delay: Option<(u32, Duration)>,
    pub abort: Option<(u32, u16, u32)>,
}

impl FaultConfig {
    pub fn from_model(f: &Fault) -> Self {
        Self {
            delay: f
                .delay
                .as_ref()
                .map(|d| (d.percent, d.duration.as_duration())),
            abort: f.abort.as_ref().map(|a| {
                (
                    a.percent,
                    a.http_status_or_default(),
                    a.grpc_status_or_default(),
                )
            }),
        }
    }

    /// Sleeps and/or refuses as configured.
    pub async fn apply(&self, rule: &str) -> Result<(), ResilienceError> {
        if let Some((percent, delay)) = self.delay
            && roll(percent)
        {
            tokio::time::sleep(delay).await;
        }
        if let Some((percent, status, grpc_status)) = self.abort
            && roll(percent)
        {
            return Err(ResilienceError::FaultInjected {
                rule: rule.to_owned(),
                status,
                grpc_status,
            });
        }
        Ok(())
    }
}

/// True for `percent`% of calls.
pub fn roll(percent: u32) -> bool {
    percent > 0 && (percent >= 100 || fastrand::u32(0..100) < percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roll_hits_the_percentage() {
        assert!(!roll(0));
        assert!(roll(100));
        let hits = (0..10_000).filter(|_| roll(30)).count();
        assert!((2700..=3300).contains(&hits), "{hits}");
    }
}
