//! The layer check: `vmm/src` imports one way, down the layers of [`LAYERS`], and no
//! modules import each other in a cycle, neither the top-level modules nor the files of one
//! folder module (`vm/exits.rs` and `vm/vcpu.rs` count as two).
//!
//! It reads `use crate::…`, `crate::x::…`, `super::…` and `self::…` paths (and names a
//! `use` or a `mod` brought into scope) in every `vmm/src/**/*.rs`, leaving out comments,
//! strings and `#[cfg(test)]` items. A folder's `mod.rs` re-exporting its own files
//! (`pub use child::Item`) is the folder's face, not a dependency: a path through it counts
//! as a path to the file that defines the item.
//!
//! Violations found today are listed in `.ci/layers-known.txt`, one a line: each listed one
//! still found is printed and passes, any other fails, and so does a listed one no longer
//! found (the list only shrinks). Run it alone with `.ci/layers`: no dependency, no build of
//! `vmm`. Standard library only, so `rustc --test` builds it as it stands.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// The target layering of `vmm/src`, bottom first: a module may import from its own layer
/// and those before it, never from a later one. The one place this order is written.
const LAYERS: &[&[&str]] = &[
    // Foundations: CPU, TSC, affinity, the guest ABI's results type, terminal and files.
    &[
        "limits",
        "escape",
        "input",
        "output",
        "console",
        "busy",
        "cpu_lock",
        "interrupt",
        "stats",
        "host",
        "results",
        "remedy",
        "arch",
    ],
    &["vm"],
    &["shaping"],
    &["modes"],
    &["native"],
    &["measure"],
    &["detector"],
    &["report", "validation", "doctor", "experiment"],
    &["cli"],
    &["commands"],
    &["main"],
];

/// Today's violations, one a line; it only shrinks.
const KNOWN: &str = ".ci/layers-known.txt";

/// How many places of one import are printed before "and N more".
const SHOWN: usize = 4;

// ---------------------------------------------------------------------------------------
// Lexing: code without comments, strings and char literals (blanked, newlines kept).

/// `src` with every comment, string and char literal replaced by spaces, lines kept, so
/// that braces, paths and `use` in text never count and line numbers stay true.
fn strip(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        // An identifier just before a quote, but for a byte literal's `b`: b'{'.
        let byte_prefix = i > 0 && chars[i - 1] == 'b' && (i < 2 || !ident(chars[i - 2]));
        let prev_ident = i > 0 && ident(chars[i - 1]) && !byte_prefix;
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && !raw_prefix_blocked(&chars, i) && matches!(next, Some('"') | Some('#')) && {
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            chars.get(j) == Some(&'"')
        } {
            // A raw string: r#"…"# with as many hashes at the end as at the start.
            let mut hashes = 0;
            i += 1;
            out.push(' ');
            while chars[i] == '#' {
                hashes += 1;
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && !prev_ident {
            // A char literal ('x', '\n', '\u{7f}') or a lifetime ('a, 'static).
            let end = if next == Some('\\') {
                (i + 2..chars.len()).find(|&j| chars[j] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether an `r` at `i` is inside an identifier (`for"`, `br"` is fine: `b` is a prefix).
fn raw_prefix_blocked(chars: &[char], i: usize) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    match i.checked_sub(1).map(|j| chars[j]) {
        Some(b) if b == 'b' || b == 'c' => i >= 2 && ident(chars[i - 2]),
        Some(p) => ident(p),
        None => false,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Identifiers, `::` and single punctuation, each with its line (numbers are dropped).
fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), line));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push((Tok::PathSep, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Parsing: the paths each file names, with the module they are named from.

/// One path a file names: in a `use` (possibly a re-export) or in code.
#[derive(Debug, Clone)]
struct Named {
    /// As written (`super`, `self`, `crate` or a name in scope first).
    path: Vec<String>,
    line: usize,
    /// The module the path is written in: the file's, then inline `mod`s.
    scope: Vec<String>,
    /// From a `use`: the name it binds (`None`: a glob or `_`), for later paths.
    binding: Option<String>,
    is_use: bool,
    /// A `pub use`: a re-export, which is a folder's face when it names its own files.
    is_pub: bool,
}

/// What one file says: the paths it names, and the module paths of its inline `mod`s
/// (which resolve to this file).
#[derive(Debug, Default)]
struct Parsed {
    named: Vec<Named>,
    inline_modules: Vec<Vec<String>>,
}

fn ident(tok: Option<&(Tok, usize)>) -> Option<&str> {
    match tok {
        Some((Tok::Ident(name), _)) => Some(name),
        _ => None,
    }
}

fn punct(tok: Option<&(Tok, usize)>, c: char) -> bool {
    matches!(tok, Some((Tok::Punct(p), _)) if *p == c)
}

/// The index just past the item starting at `i`: its `;`, or its `{ … }`.
fn item_end(toks: &[(Tok, usize)], mut i: usize) -> usize {
    let mut nesting = 0i32;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct('(') | Tok::Punct('[') => nesting += 1,
            Tok::Punct(')') | Tok::Punct(']') => nesting -= 1,
            Tok::Punct(';') if nesting == 0 => return i + 1,
            Tok::Punct('{') if nesting == 0 => return matching_brace(toks, i) + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// The index of the `}` closing the `{` at `open`.
fn matching_brace(toks: &[(Tok, usize)], open: usize) -> usize {
    let mut depth = 0;
    for (i, (tok, _)) in toks.iter().enumerate().skip(open) {
        match tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

/// Whether an attribute's tokens make the item test-only (`cfg(test)`, `cfg(all(test, …))`).
fn is_test_cfg(attr: &[(Tok, usize)]) -> bool {
    let has = |name: &str| attr.iter().any(|(t, _)| *t == Tok::Ident(name.into()));
    has("cfg") && has("test") && !has("not")
}

/// The paths a file names. `scope` is the file's module path (`["vm", "exits"]`).
fn parse(code: &str, scope: &[String]) -> Parsed {
    let toks = tokens(code);
    let mut parsed = Parsed::default();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut test_only = false;
    let mut i = 0;
    let here = |inline: &[(String, usize)]| -> Vec<String> {
        scope
            .iter()
            .cloned()
            .chain(inline.iter().map(|(n, _)| n.clone()))
            .collect()
    };
    while i < toks.len() {
        let (tok, line) = &toks[i];
        match tok {
            Tok::Punct('#') => {
                let inner = punct(toks.get(i + 1), '!');
                let open = if inner { i + 2 } else { i + 1 };
                if punct(toks.get(open), '[') {
                    let mut close = open;
                    let mut nesting = 0;
                    while close < toks.len() {
                        match toks[close].0 {
                            Tok::Punct('[') => nesting += 1,
                            Tok::Punct(']') => {
                                nesting -= 1;
                                if nesting == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        close += 1;
                    }
                    if is_test_cfg(&toks[open..close.min(toks.len())]) {
                        if inner && depth == 0 && inline.is_empty() {
                            return Parsed::default(); // the whole file is test-only
                        }
                        test_only = true;
                    }
                    i = close + 1;
                    continue;
                }
                i += 1;
            }
            _ if test_only => {
                i = item_end(&toks, i);
                test_only = false;
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(name), true) = (ident(toks.get(i + 1)), punct(toks.get(i + 2), '{')) {
                    depth += 1;
                    inline.push((name.to_string(), depth));
                    parsed.inline_modules.push(here(&inline));
                    i += 3;
                } else {
                    i = item_end(&toks, i);
                }
            }
            Tok::Ident(kw) if kw == "use" => {
                let end = item_end(&toks, i);
                let is_pub = use_is_pub(&toks, i);
                let mut leaves = Vec::new();
                use_tree(&toks[i + 1..end.saturating_sub(1)], &mut 0, &[], &mut leaves);
                for (path, line, binding) in leaves {
                    parsed.named.push(Named {
                        path,
                        line,
                        scope: here(&inline),
                        binding,
                        is_use: true,
                        is_pub,
                    });
                }
                i = end;
            }
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(first)
                if matches!(toks.get(i + 1), Some((Tok::PathSep, _)))
                    && !matches!(toks.get(i.wrapping_sub(1)), Some((Tok::PathSep, _))) =>
            {
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while matches!(toks.get(j), Some((Tok::PathSep, _))) {
                    match ident(toks.get(j + 1)) {
                        Some(name) => {
                            path.push(name.to_string());
                            j += 2;
                        }
                        None => break,
                    }
                }
                parsed.named.push(Named {
                    path,
                    line: *line,
                    scope: here(&inline),
                    binding: None,
                    is_use: false,
                    is_pub: false,
                });
                i = j;
            }
            _ => i += 1,
        }
    }
    parsed
}

/// Whether the `use` at `i` is `pub`, `pub(crate)`, `pub(super)`, …
fn use_is_pub(toks: &[(Tok, usize)], i: usize) -> bool {
    let mut j = i;
    if j > 0 && punct(toks.get(j - 1), ')') {
        while j > 0 && !punct(toks.get(j - 1), '(') {
            j -= 1;
        }
        j = j.saturating_sub(1);
    }
    j > 0 && ident(toks.get(j - 1)) == Some("pub")
}

/// Expands a use tree (`a::{b, c::{self, d as e}, f::*}`) into its leaves: the full path,
/// its line and the name it binds.
fn use_tree(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    prefix: &[String],
    out: &mut Vec<(Vec<String>, usize, Option<String>)>,
) {
    let mut path = prefix.to_vec();
    let mut line = toks.get(*pos).map_or(0, |t| t.1);
    if matches!(toks.get(*pos), Some((Tok::PathSep, _))) {
        // `::std::…`: an extern crate, never this one.
        *pos = toks.len();
        return;
    }
    loop {
        match toks.get(*pos) {
            Some((Tok::Ident(name), l)) if name != "as" => {
                path.push(name.clone());
                line = *l;
                *pos += 1;
            }
            Some((Tok::Punct('{'), _)) => {
                *pos += 1;
                while *pos < toks.len() && !punct(toks.get(*pos), '}') {
                    use_tree(toks, pos, &path, out);
                    if punct(toks.get(*pos), ',') {
                        *pos += 1;
                    }
                }
                *pos += 1;
                return;
            }
            Some((Tok::Punct('*'), l)) => {
                out.push((path, *l, None));
                *pos += 1;
                return;
            }
            _ => break,
        }
        if matches!(toks.get(*pos), Some((Tok::PathSep, _))) {
            *pos += 1;
        } else {
            break;
        }
    }
    let mut binding = path.last().cloned();
    if path.last().map(String::as_str) == Some("self") {
        path.pop();
        binding = path.last().cloned();
    }
    if ident(toks.get(*pos)) == Some("as") {
        binding = ident(toks.get(*pos + 1)).filter(|n| *n != "_").map(str::to_string);
        *pos += 2;
    }
    if !path.is_empty() {
        out.push((path, line, binding));
    }
}

// ---------------------------------------------------------------------------------------
// Resolving: which file (module node) each path reaches.

/// One source file of the crate.
struct File {
    /// Relative to the repository root, for messages.
    shown: String,
    /// Its module path (`["vm", "exits"]`; `[]` for lib.rs; `["main"]` for main.rs).
    module: Vec<String>,
    /// A folder's `mod.rs` (or the crate root).
    is_folder: bool,
    is_bin: bool,
    parsed: Parsed,
}

fn node_name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

/// Every module the crate has (files and inline modules), each with the file it is in.
struct Crate {
    files: Vec<File>,
    modules: BTreeMap<Vec<String>, usize>,
    /// A folder's re-exports of its own files: (folder module, name) → the full path.
    facade: BTreeMap<(Vec<String>, String), Vec<String>>,
}

impl Crate {
    fn new(files: Vec<File>) -> Crate {
        let mut modules = BTreeMap::new();
        for (index, file) in files.iter().enumerate() {
            modules.insert(file.module.clone(), index);
            for inline in &file.parsed.inline_modules {
                modules.insert(inline.clone(), index);
            }
        }
        let mut krate = Crate {
            files,
            modules,
            facade: BTreeMap::new(),
        };
        let mut facade = BTreeMap::new();
        for file in &krate.files {
            for named in file.parsed.named.iter().filter(|n| n.is_use && n.is_pub) {
                let (Some(binding), Some(full)) = (&named.binding, krate.absolute(file, named, false)) else {
                    continue;
                };
                if full.len() > file.module.len() + 1 && full.starts_with(&file.module) && !file.module.is_empty() {
                    facade.insert((file.module.clone(), binding.clone()), full);
                }
            }
        }
        krate.facade = facade;
        krate
    }

    /// The path from the crate root that `named` spells, if it is in this crate.
    fn absolute(&self, file: &File, named: &Named, aliases: bool) -> Option<Vec<String>> {
        let path = &named.path;
        let first = path.first()?.as_str();
        let scope = &named.scope;
        let rest = |skip: usize| path[skip..].iter().cloned();
        match first {
            "crate" if !file.is_bin => Some(rest(1).collect()),
            "vmm" if file.is_bin => Some(rest(1).collect()),
            "super" => {
                let ups = path.iter().take_while(|s| *s == "super").count();
                let base = scope.len().checked_sub(ups)?;
                Some(scope[..base].iter().cloned().chain(rest(ups)).collect())
            }
            "self" => Some(scope.iter().cloned().chain(rest(1)).collect()),
            _ => {
                let mut child = scope.clone();
                child.push(first.to_string());
                if self.modules.contains_key(&child) && !file.is_bin {
                    return Some(scope.iter().cloned().chain(rest(0)).collect());
                }
                if !aliases {
                    return None;
                }
                // A name a `use` brought into scope (`use crate::vm;` then `vm::exits::…`).
                let alias = file
                    .parsed
                    .named
                    .iter()
                    .filter(|n| n.is_use && n.binding.as_deref() == Some(first))
                    .find_map(|n| self.absolute(file, n, false))?;
                Some(alias.into_iter().chain(rest(1)).collect())
            }
        }
    }

    /// The file module a crate path reaches: its longest module prefix, through a folder's
    /// re-exports of its own files.
    fn node(&self, full: &[String]) -> Vec<String> {
        let mut len = full.len();
        while len > 0 && !self.modules.contains_key(&full[..len]) {
            len -= 1;
        }
        let index = self.modules.get(&full[..len]).copied();
        let file_module = index.map_or(Vec::new(), |i| self.files[i].module.clone());
        if let (Some(i), Some(next)) = (index, full.get(len)) {
            if self.files[i].is_folder && len == file_module.len() {
                if let Some(target) = self.facade.get(&(file_module.clone(), next.clone())) {
                    let mut target = target.clone();
                    target.extend(full[len + 1..].iter().cloned());
                    return self.node(&target);
                }
            }
        }
        file_module
    }
}

/// One place a file names another module.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    file: String,
    line: usize,
}

/// Edges between file modules: (from, to) → the places, in order.
type Edges = BTreeMap<(String, String), Vec<Place>>;

fn edges(krate: &Crate) -> Edges {
    let mut edges: Edges = BTreeMap::new();
    for file in &krate.files {
        for named in &file.parsed.named {
            let Some(full) = krate.absolute(file, named, true) else {
                continue;
            };
            let target = krate.node(&full);
            // A folder's face, re-exporting its own files, is no dependency of its own.
            if named.is_use && named.is_pub && target.starts_with(&file.module) {
                continue;
            }
            if target.is_empty() || target == file.module {
                continue;
            }
            edges
                .entry((node_name(&file.module), node_name(&target)))
                .or_default()
                .push(Place {
                    file: file.shown.clone(),
                    line: named.line,
                });
        }
    }
    for places in edges.values_mut() {
        places.sort();
        places.dedup();
    }
    edges
}

// ---------------------------------------------------------------------------------------
// Cycles.

/// The strongly connected components with more than one node (each a set of modules that
/// reach each other, so every import among them is part of some cycle), Tarjan's way.
fn cycles(nodes: &BTreeSet<String>, edges: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    struct State<'a> {
        succ: BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.succ.get(v).cloned().unwrap_or_default() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        succ: BTreeMap::new(),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for (from, to) in edges {
        if from != to {
            state.succ.entry(from.as_str()).or_default().push(to.as_str());
        }
    }
    for node in nodes {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found.sort();
    state.found
}

/// A shortest cycle through the component's first node, for the message.
fn one_cycle(component: &[String], edges: &BTreeSet<(String, String)>) -> Vec<String> {
    let start = &component[0];
    let inside: BTreeSet<&String> = component.iter().collect();
    let mut previous: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for (_, w) in edges.iter().filter(|(f, t)| f == v && inside.contains(t)) {
            if w == start {
                let mut cycle = vec![v.clone()];
                let mut at = v;
                while at != start {
                    at = previous[at];
                    cycle.push(at.clone());
                }
                cycle.reverse();
                cycle.push(start.clone());
                return cycle;
            }
            if !previous.contains_key(w) {
                previous.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    component.to_vec()
}

// ---------------------------------------------------------------------------------------
// The check.

/// One violation: its line in the known list, and what to print about it.
struct Violation {
    key: String,
    detail: Vec<String>,
}

fn top(node: &str) -> &str {
    node.split("::").next().unwrap_or(node)
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn places(places: &[Place]) -> String {
    let mut shown: Vec<String> = places
        .iter()
        .take(SHOWN)
        .map(|p| format!("{}:{}", p.file, p.line))
        .collect();
    if places.len() > SHOWN {
        shown.push(format!("and {} more", places.len() - SHOWN));
    }
    shown.join(", ")
}

/// Every violation of the layering in these files: modules in no layer, imports up the
/// layers, and cycles among the top-level modules and among the files of each folder.
fn violations(krate: &Crate) -> Vec<Violation> {
    let edges = edges(krate);
    let mut found = Vec::new();

    let tops: BTreeSet<String> = krate
        .files
        .iter()
        .filter(|f| !f.module.is_empty())
        .map(|f| f.module[0].clone())
        .collect();
    for module in &tops {
        if layer(module).is_none() {
            found.push(Violation {
                key: format!("unplaced: {module}"),
                detail: vec![format!(
                    "`{module}` is in no layer: add it to LAYERS in tests/layers.rs"
                )],
            });
        }
    }

    // Up the layers: by importing file and the module it reaches.
    let mut ups: Edges = BTreeMap::new();
    for ((from, to), at) in &edges {
        let (from_top, to_top) = (top(from), top(to));
        if let (Some(a), Some(b)) = (layer(from_top), layer(to_top)) {
            if b > a {
                for place in at {
                    ups.entry((place.file.clone(), to_top.to_string()))
                        .or_default()
                        .push(place.clone());
                }
            }
        }
    }
    for ((file, to), mut at) in ups {
        at.sort();
        at.dedup();
        found.push(Violation {
            key: format!("up: {file} -> {to}"),
            detail: vec![format!("imports `{to}`, a later layer, at {}", places(&at))],
        });
    }

    // Cycles among top-level modules, then among the files of each folder module.
    let mut graphs: Vec<(BTreeSet<String>, Edges)> = Vec::new();
    let mut top_edges: Edges = BTreeMap::new();
    for ((from, to), at) in &edges {
        if top(from) != top(to) && from != "crate" {
            top_edges
                .entry((top(from).into(), top(to).into()))
                .or_default()
                .extend(at.iter().cloned());
        }
    }
    graphs.push((tops.clone(), top_edges));
    for folder in &tops {
        let nodes: BTreeSet<String> = krate
            .files
            .iter()
            .filter(|f| f.module.first() == Some(folder))
            .map(|f| node_name(&f.module))
            .collect();
        let inner: Edges = edges
            .iter()
            .filter(|((f, t), _)| nodes.contains(f) && nodes.contains(t))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        graphs.push((nodes, inner));
    }
    for (nodes, graph) in graphs {
        let pairs: BTreeSet<(String, String)> = graph.keys().cloned().collect();
        for component in cycles(&nodes, &pairs) {
            let mut detail = vec![format!("for example {}", one_cycle(&component, &pairs).join(" -> "))];
            for ((from, to), at) in &graph {
                if component.contains(from) && component.contains(to) {
                    let mut at = at.clone();
                    at.sort();
                    at.dedup();
                    detail.push(format!("{from} -> {to} at {}", places(&at)));
                }
            }
            found.push(Violation {
                key: format!("cycle: {}", component.join(" ")),
                detail,
            });
        }
    }
    found
}

/// Whether the cycle `key` is what is left of the listed cycle `was` (fewer modules, after a
/// fix), so the message can say so rather than call it new.
fn shrunk_from(key: &str, was: &str) -> bool {
    let members = |k: &str| -> Option<BTreeSet<String>> {
        k.strip_prefix("cycle: ")
            .map(|m| m.split(' ').map(str::to_string).collect())
    };
    match (members(key), members(was)) {
        (Some(now), Some(before)) => now.is_subset(&before) && now != before,
        _ => false,
    }
}

/// The crate's files under `src` (relative names shown from `root`).
fn read_crate(root: &Path) -> Crate {
    let src = root.join("vmm/src");
    let mut paths = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                paths.push(path);
            }
        }
    }
    paths.sort();
    let files = paths
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&src).unwrap();
            let mut module: Vec<String> = relative
                .with_extension("")
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            let last = module.last().cloned().unwrap_or_default();
            let is_folder = last == "mod" || last == "lib";
            if is_folder {
                module.pop();
            }
            let is_bin = module == ["main"];
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let parsed = parse(&strip(&text), &module);
            File {
                shown: format!("vmm/src/{}", relative.display()),
                module,
                is_folder,
                is_bin,
                parsed,
            }
        })
        .collect();
    Crate::new(files)
}

/// The repository root: from cargo's manifest directory, or the working directory when
/// `.ci/layers` built this with plain rustc.
fn root() -> PathBuf {
    match option_env!("CARGO_MANIFEST_DIR") {
        Some(dir) => Path::new(dir).join(".."),
        None => std::env::current_dir().unwrap(),
    }
}

#[test]
fn layers_hold_but_for_known_violations() {
    let root = root();
    let krate = read_crate(&root);
    let found = violations(&krate);
    let known_text = std::fs::read_to_string(root.join(KNOWN)).unwrap_or_default();
    let known: BTreeSet<&str> = known_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let found_keys: BTreeSet<&str> = found.iter().map(|v| v.key.as_str()).collect();
    let gone: BTreeSet<&str> = known.difference(&found_keys).copied().collect();
    let mut failures = Vec::new();
    let mut replaced = BTreeSet::new();
    for violation in &found {
        if known.contains(violation.key.as_str()) {
            println!("known violation still present: {}", violation.key);
        } else if let Some(was) = gone.iter().find(|g| shrunk_from(&violation.key, g)) {
            println!(
                "known cycle shrank: {} (listed as `{was}`): put the new line in its place",
                violation.key
            );
            failures.push(format!("shrank: {}", violation.key));
            replaced.insert(*was);
        } else {
            println!("NEW violation: {}", violation.key);
            failures.push(format!("new: {}", violation.key));
        }
        for line in &violation.detail {
            println!("    {line}");
        }
    }
    for gone in gone.difference(&replaced) {
        println!("listed violation is gone: {gone}: delete its line from {KNOWN} (the list only shrinks)");
        failures.push(format!("gone: {gone}"));
    }
    println!(
        "layers: {} violations, {} known, {} files read",
        found.len(),
        known.len(),
        krate.files.len()
    );
    assert!(
        failures.is_empty(),
        "the layer check failed ({}): fix a new import, or for one that is gone, delete its \
         line from {KNOWN}; the layers are LAYERS in tests/layers.rs (run .ci/layers to see all)",
        failures.join("; ")
    );
}

// ---------------------------------------------------------------------------------------
// The checker's own tests, on made-up code and graphs.

fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn cycle_detection_on_a_tiny_graph() {
    // a → b → c → a is one cycle, d ⇄ e another; c → d joins them one way only, and f
    // imports itself (a file naming its own items), which is no cycle.
    let nodes: BTreeSet<String> = ["a", "b", "c", "d", "e", "f", "g"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let edges = set(&[
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("c", "d"),
        ("d", "e"),
        ("e", "d"),
        ("f", "f"),
        ("g", "a"),
    ]);
    let found = cycles(&nodes, &edges);
    assert_eq!(found, vec![vec!["a", "b", "c"], vec!["d", "e"]]);
    assert_eq!(one_cycle(&found[0], &edges), vec!["a", "b", "c", "a"]);
    assert_eq!(one_cycle(&found[1], &edges), vec!["d", "e", "d"]);
    assert!(cycles(&nodes, &set(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
}

/// A crate from (file, text) pairs, as `read_crate` would make it.
fn made_up(sources: &[(&str, &str)]) -> Crate {
    let files = sources
        .iter()
        .map(|(name, text)| {
            let mut module: Vec<String> = name.trim_end_matches(".rs").split('/').map(str::to_string).collect();
            let is_folder = module.last().is_some_and(|l| l == "mod" || l == "lib");
            if is_folder {
                module.pop();
            }
            File {
                shown: name.to_string(),
                is_bin: module == ["main"],
                parsed: parse(&strip(text), &module),
                module,
                is_folder,
            }
        })
        .collect();
    Crate::new(files)
}

fn keys(krate: &Crate) -> Vec<String> {
    violations(krate).into_iter().map(|v| v.key).collect()
}

#[test]
fn reads_imports_as_the_compiler_resolves_them() {
    let krate = made_up(&[
        ("lib.rs", "pub mod stats; pub mod vm; pub mod shaping;"),
        ("stats.rs", "// use crate::vm::Vm;\n/// crate::shaping::x\nconst S: &str = \"crate::vm::y\";"),
        (
            "vm/mod.rs",
            "pub mod exits;\npub mod vcpu;\npub use vcpu::Vcpu;\nuse crate::{stats, shaping::profile::{self, Profile}};\n\
             fn f() { exits::handle(); }\n#[cfg(test)]\nmod tests { use crate::shaping::Hide; }",
        ),
        ("vm/exits.rs", "use super::Vcpu;\npub fn handle<'a>() { let c = ('{', b'{', r#\"}\"#); }"),
        ("vm/vcpu.rs", "pub struct Vcpu;\nfn g() { super::exits::handle(); }"),
        ("shaping/mod.rs", "pub mod profile;\nuse crate::vm;\nfn h() { vm::exits::handle(); }"),
        (
            "shaping/profile.rs",
            "#[cfg(test)]\nmod tests { const C: (char, u8, &str) = ('}', b'}', r#\"}\"#); use crate::vm::Hidden; }\n\
             use crate::stats;",
        ),
    ]);
    let edges = edges(&krate);
    let pairs: Vec<(&str, &str, usize)> = edges
        .iter()
        .flat_map(|((f, t), at)| at.iter().map(move |p| (f.as_str(), t.as_str(), p.line)))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("shaping", "vm", 2),
            ("shaping", "vm::exits", 3),
            ("shaping::profile", "stats", 3),
            ("vm", "shaping::profile", 4),
            ("vm", "stats", 4),
            ("vm", "vm::exits", 5),
            ("vm::exits", "vm::vcpu", 1),
            ("vm::vcpu", "vm::exits", 2),
        ]
    );
    assert_eq!(
        keys(&krate),
        vec![
            "up: vm/mod.rs -> shaping",
            "cycle: shaping vm",
            "cycle: vm::exits vm::vcpu",
        ]
    );
}

#[test]
fn a_cycle_that_lost_modules_is_told_apart_from_a_new_one() {
    assert!(shrunk_from("cycle: a b", "cycle: a b c"));
    assert!(!shrunk_from("cycle: a d", "cycle: a b c"));
    assert!(!shrunk_from("cycle: a b c", "cycle: a b c"));
    assert!(!shrunk_from("up: x.rs -> a", "cycle: a b c"));
}

#[test]
fn a_module_in_no_layer_is_a_violation() {
    let krate = made_up(&[("lib.rs", "pub mod gadgets;"), ("gadgets.rs", "")]);
    assert_eq!(keys(&krate), vec!["unplaced: gadgets"]);
}
