//! Longest-prefix lookup: a radix tree over the routes' prefixes (byte strings), walked once
//! per request. The cost grows with the depth of the prefixes that match the path (a few
//! byte comparisons each), not with the number of routes, and a lookup allocates nothing.

use http::Method;

/// The methods a route is limited to (`methods = [...]`). `GET` admits `HEAD` too, as
/// nginx's `limit_except` does: a cache answers `HEAD` from the `GET` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Methods {
    /// As listed in the file (for `/status` and the metrics' labels).
    listed: Vec<Method>,
    /// The standard methods admitted, one bit each ([`standard_bit`]).
    mask: u16,
    /// Extension methods (tokens outside RFC 9110's set), compared as strings.
    extension: Vec<Method>,
}

impl Methods {
    /// The set of `listed` (already validated as distinct tokens).
    pub(super) fn new(listed: Vec<Method>) -> Self {
        let mut mask = 0;
        let mut extension = Vec::new();
        for m in &listed {
            match standard_bit(m) {
                Some(bit) => mask |= bit,
                None => extension.push(m.clone()),
            }
        }
        if mask & standard_bit(&Method::GET).unwrap_or(0) != 0 {
            mask |= standard_bit(&Method::HEAD).unwrap_or(0);
        }
        Methods {
            listed,
            mask,
            extension,
        }
    }

    /// Whether a request with `method` may use the route.
    #[inline]
    pub fn allows(&self, method: &Method) -> bool {
        match standard_bit(method) {
            Some(bit) => self.mask & bit != 0,
            None => self.extension.contains(method),
        }
    }

    /// The methods as listed in the file.
    pub fn listed(&self) -> &[Method] {
        &self.listed
    }

    /// A method both sets admit, if any (two routes with one prefix must not share one).
    pub(super) fn shared_with(&self, other: &Methods) -> Option<Method> {
        let common = self.mask & other.mask;
        if common != 0 {
            return STANDARD
                .iter()
                .find(|m| standard_bit(m).is_some_and(|b| b & common != 0))
                .cloned();
        }
        self.extension
            .iter()
            .find(|m| other.extension.contains(m))
            .cloned()
    }

    /// `GET,POST` (the `methods` label of the route's metrics).
    pub fn label(&self) -> String {
        let names: Vec<&str> = self.listed.iter().map(Method::as_str).collect();
        names.join(",")
    }
}

/// RFC 9110's methods and PATCH (RFC 5789), in bit order.
const STANDARD: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// The bit of a standard method; `None` for an extension method.
#[inline]
fn standard_bit(m: &Method) -> Option<u16> {
    let i = match m.as_str() {
        "GET" => 0,
        "HEAD" => 1,
        "POST" => 2,
        "PUT" => 3,
        "DELETE" => 4,
        "CONNECT" => 5,
        "OPTIONS" => 6,
        "TRACE" => 7,
        "PATCH" => 8,
        _ => return None,
    };
    Some(1 << i)
}

/// Whether `m` is a standard method's name in other letter case (`get`): methods are
/// case-sensitive, so `get` would be an extension method no client sends by mistake.
pub(super) fn miscased_standard(m: &str) -> Option<&'static str> {
    STANDARD
        .iter()
        .map(Method::as_str)
        .find(|s| *s != m && s.eq_ignore_ascii_case(m))
}

/// A radix tree of prefixes; each node lists the routes whose prefix ends there.
#[derive(Debug, Default)]
pub(super) struct Tree {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// The bytes on the edge from the parent (empty at the root only).
    label: Box<[u8]>,
    /// Routes with a method list whose prefix ends here, in file order (their method sets
    /// are disjoint: validation refuses overlaps).
    specific: Vec<usize>,
    /// The route without a method list whose prefix ends here; tried after `specific`.
    any_method: Option<usize>,
    /// Sorted by the first byte of their label, which is distinct among siblings.
    children: Vec<Node>,
}

impl Tree {
    /// Adds route `route` under `prefix`. `specific`: the route lists its methods (it is
    /// tried before a route with the same prefix that takes every method).
    pub(super) fn insert(&mut self, prefix: &str, route: usize, specific: bool) {
        let node = insert(&mut self.root, prefix.as_bytes());
        if specific {
            node.specific.push(route);
        } else {
            node.any_method = Some(route);
        }
    }

    /// The route of the longest prefix of `path` that `accept`s the request (its methods);
    /// when the longest refuses, the next longest, and so on.
    #[inline]
    pub(super) fn find(&self, path: &str, accept: impl Fn(usize) -> bool) -> Option<usize> {
        find(&self.root, path.as_bytes(), &accept)
    }
}

/// Walks (and extends) the tree along `key`, splitting an edge where `key` leaves it, and
/// returns the node where `key` ends.
fn insert<'n>(node: &'n mut Node, key: &[u8]) -> &'n mut Node {
    let Some(&first) = key.first() else {
        return node;
    };
    let pos = match node.children.binary_search_by_key(&first, |c| c.label[0]) {
        Ok(pos) => pos,
        Err(pos) => {
            node.children.insert(
                pos,
                Node {
                    label: key.into(),
                    ..Node::default()
                },
            );
            return &mut node.children[pos];
        }
    };
    let child = &mut node.children[pos];
    let common = child
        .label
        .iter()
        .zip(key)
        .take_while(|(a, b)| a == b)
        .count();
    if common < child.label.len() {
        // `key` leaves this edge part way: the shared part becomes a node of its own.
        let head: Box<[u8]> = child.label[..common].into();
        let mut old = std::mem::take(child);
        old.label = old.label[common..].into();
        child.label = head;
        child.children.push(old);
    }
    insert(child, &key[common..])
}

/// The deepest node along `rest` with a route that `accept`s, searched deepest first: one
/// walk down (no recursion), remembering the nodes passed, then back up.
fn find(root: &Node, path: &[u8], accept: &impl Fn(usize) -> bool) -> Option<usize> {
    const DEPTH: usize = 32;
    let mut passed: [&Node; DEPTH] = [root; DEPTH];
    let mut depth = 0;
    let (mut node, mut rest) = (root, path);
    loop {
        if depth == DEPTH {
            // A deeper tree than any sane routes file: finish the walk the slow way.
            return find_deep(node, rest, accept).or_else(|| best(&passed[..depth], accept));
        }
        passed[depth] = node;
        depth += 1;
        let Some(&first) = rest.first() else { break };
        let Ok(pos) = node.children.binary_search_by_key(&first, |c| c.label[0]) else {
            break;
        };
        let child = &node.children[pos];
        if !rest.starts_with(&child.label) {
            break;
        }
        rest = &rest[child.label.len()..];
        node = child;
    }
    best(&passed[..depth], accept)
}

/// The first route that `accept`s among `nodes`, deepest (last) first.
#[inline]
fn best(nodes: &[&Node], accept: &impl Fn(usize) -> bool) -> Option<usize> {
    nodes.iter().rev().find_map(|node| {
        node.specific
            .iter()
            .copied()
            .chain(node.any_method)
            .find(|&i| accept(i))
    })
}

/// [`find`] below `node`, recursively (only past [`find`]'s depth).
fn find_deep(node: &Node, rest: &[u8], accept: &impl Fn(usize) -> bool) -> Option<usize> {
    if let Some(&first) = rest.first() {
        if let Ok(pos) = node.children.binary_search_by_key(&first, |c| c.label[0]) {
            let child = &node.children[pos];
            if rest.starts_with(&child.label) {
                if let Some(found) = find_deep(child, &rest[child.label.len()..], accept) {
                    return Some(found);
                }
            }
        }
    }
    best(&[node], accept)
}
