//! Maps a path inside a configuration (`routes[0].rules[1]`) back to a line of the YAML text it
//! came from, so that semantic errors point at `file:line` like syntax errors do.
//!
//! serde forgets positions, so this re-reads the text with a marking YAML parser. It only runs on
//! the error path.

use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One step of a path into a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl fmt::Display for Seg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seg::Key(k) => f.write_str(k),
            Seg::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// `routes[0].rules[1].backends`.
pub fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        if matches!(seg, Seg::Key(_)) && !out.is_empty() {
            out.push('.');
        }
        out.push_str(&seg.to_string());
    }
    out
}

enum Node {
    Leaf(usize),
    Seq(usize, Vec<Node>),
    Map(usize, Vec<(String, usize, Node)>),
}

impl Node {
    fn line(&self) -> usize {
        match self {
            Node::Leaf(l) | Node::Seq(l, _) | Node::Map(l, _) => *l,
        }
    }
}

enum Frame {
    Seq(usize, Vec<Node>),
    Map(usize, Vec<(String, usize, Node)>, Option<(String, usize)>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
}

impl Builder {
    fn push_node(&mut self, node: Node, scalar: Option<String>) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending)) => match pending.take() {
                Some((k, kl)) => entries.push((k, kl, node)),
                None => *pending = Some((scalar.unwrap_or_default(), node.line())),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(value, ..) => self.push_node(Node::Leaf(line), Some(value)),
            Event::Alias(_) => self.push_node(Node::Leaf(line), None),
            Event::SequenceStart(..) => self.stack.push(Frame::Seq(line, Vec::new())),
            Event::MappingStart(..) => self.stack.push(Frame::Map(line, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(l, items)) => Node::Seq(l, items),
                    Some(Frame::Map(l, entries, _)) => Node::Map(l, entries),
                    None => return,
                };
                self.push_node(node, None);
            }
            _ => {}
        }
    }
}

/// The 1-based line of the deepest node of `path` found in `text`.
pub fn line_of(text: &str, path: &[Seg]) -> Option<usize> {
    let mut builder = Builder::default();
    Parser::new_from_str(text).load(&mut builder, false).ok()?;
    let mut node = builder.root.as_ref()?;
    let mut line = node.line();
    for seg in path {
        let next = match (seg, node) {
            (Seg::Key(k), Node::Map(_, entries)) => entries
                .iter()
                .find(|(name, ..)| name == k)
                .map(|(_, key_line, child)| {
                    line = *key_line;
                    child
                }),
            (Seg::Index(i), Node::Seq(_, items)) => {
                items.get(*i).inspect(|child| line = child.line())
            }
            _ => None,
        };
        match next {
            Some(child) => node = child,
            None => break,
        }
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_lines() {
        let text = "a:\n  - x: 1\n  - x: 2\n    y:\n      - {z: 3}\n";
        let path = |segs: &[Seg]| line_of(text, segs);
        let k = |s: &str| Seg::Key(s.to_owned());
        assert_eq!(path(&[k("a"), Seg::Index(1), k("x")]), Some(3));
        assert_eq!(
            path(&[k("a"), Seg::Index(1), k("y"), Seg::Index(0), k("z")]),
            Some(5)
        );
        // Missing tails fall back to the deepest node found.
        assert_eq!(path(&[k("a"), Seg::Index(1), k("nope")]), Some(3));
        assert_eq!(display_path(&[k("a"), Seg::Index(1), k("y")]), "a[1].y");
    }
}
