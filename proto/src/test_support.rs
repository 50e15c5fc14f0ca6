//! Fixtures shared by the model's unit tests.

/// A mesh with one service `reviews` and one route whose one rule sends everything there,
/// followed by `rule` (YAML lines of that rule, indented for it).
pub fn one_rule_mesh(rule: &str) -> String {
    format!(
        r#"services:
  - name: reviews
    endpoints: [{{address: "127.0.0.1:9"}}]
routes:
  - name: reviews
    hosts: [reviews]
    rules:
      - backends: [{{service: reviews}}]
{rule}
"#
    )
}
