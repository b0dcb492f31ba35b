//! World-info activation: which lorebook entries fire for the next reply, and
//! why. Pure and bounded: chat text and books in, a list of entries out; the
//! prompt builder places them by position.
//!
//! One activation runs in passes. Pass 0 scans the newest chat messages; when
//! recursion is on, later passes (at most `max_recursion`) scan the same
//! messages plus the content activated so far. In each pass the entries that
//! trigger are filtered by inclusion group (one winner per group), then rolled
//! for probability, then admitted to the token budget by priority; once the
//! budget overflows, scanning stops.
//!
//! Decisions worth knowing:
//! - Constants roll for probability too, as SillyTavern does: a constant at 50%
//!   is in half the replies.
//! - `@@exclude_keys` keeps an entry off even when it is constant or `@@activate`d.
//! - `@@reverse_depth N` is placed at depth `messages - N` (N from the start of
//!   the chat); `@@position` maps as [`Position::from_decorator`] says.
//! - Delayed entries (`delay_until_recursion`) fire only when recursion is on;
//!   the first recursion pass runs for them even if nothing else fired.
//! - Regex keys (`/pattern/flags` or every key under `use_regex`) match the
//!   text as written; only the `i` flag makes them case-insensitive. At most
//!   [`MAX_REGEXES`] distinct patterns compile per activation; the rest, and
//!   any that fail to compile, are matched as plain text.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::lorebook::{Decorator, Entry, Logic, Lorebook, Position, Role};

/// Distinct regex patterns compiled per activation; keys are untrusted.
pub const MAX_REGEXES: usize = 512;
/// Compiled size one key's regex may reach.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Windows of a long key examined when choosing the rarest to look up.
const WINDOWS_TRIED: usize = 32;

/// One chat message as world info sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanMessage<'a> {
    /// Who wrote it; scanned as `name: text`.
    pub name: &'a str,
    /// What they wrote.
    pub text: &'a str,
}

/// Everything one activation looks at.
#[derive(Debug, Clone, Copy)]
pub struct Scan<'a> {
    /// The books in effect, in priority order (the character's first).
    pub books: &'a [&'a Lorebook],
    /// The whole visible chat, oldest first.
    pub messages: &'a [ScanMessage<'a>],
    /// Newest messages scanned; a book's `scan_depth` wins, an entry's wins over that.
    pub scan_depth: usize,
    /// Tokens all activated content may take; a book's `token_budget` caps its share.
    pub budget: usize,
    /// Scan activated content for more keys (also on for books with `recursive_scanning`).
    pub recursive: bool,
    /// Most recursion passes after the first scan.
    pub max_recursion: usize,
    /// Per reply: the same seed gives the same probability rolls and group picks.
    pub seed: u64,
    /// Case sensitivity for entries that leave it unset.
    pub case_sensitive: bool,
    /// Whole-word matching for entries that leave it unset.
    pub match_whole_words: bool,
}

impl Default for Scan<'_> {
    fn default() -> Self {
        Self {
            books: &[],
            messages: &[],
            scan_depth: 2,
            // A quarter of a 2,048-token window.
            budget: 512,
            recursive: false,
            max_recursion: 3,
            seed: 0,
            case_sensitive: false,
            match_whole_words: false,
        }
    }
}

/// An entry that fired, ready to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activated {
    /// Index of its book in [`Scan::books`].
    pub book: usize,
    /// Index of the entry in its book.
    pub entry: usize,
    /// The entry's id.
    pub id: i64,
    /// The entry's label, for the chat view.
    pub comment: String,
    /// What goes into the prompt (decorators stripped).
    pub content: String,
    /// Where it goes (after decorators).
    pub position: Position,
    /// Messages from the end, for [`Position::AtDepth`].
    pub depth: usize,
    /// Who speaks it, for [`Position::AtDepth`].
    pub role: Role,
    /// Insertion order: lower is earlier.
    pub order: i64,
    /// Tokens of `content`.
    pub tokens: usize,
    /// Why it fired.
    pub reason: Reason,
}

/// Why an entry fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// It is constant.
    Constant,
    /// An `@@activate` decorator.
    Decorator,
    /// A key was found.
    Key {
        /// The primary key found.
        key: String,
        /// The secondary key found, when the logic needs one present.
        secondary: Option<String>,
        /// Messages back from the newest (0 = newest) that held the key; 0
        /// when it was found in activated content.
        message: usize,
        /// Whether it fired in a recursion pass.
        recursion: bool,
    },
}

/// The outcome of one activation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Activation {
    /// Entries that fired and fit, sorted by insertion order (then book, entry).
    pub entries: Vec<Activated>,
    /// `(book, entry)` of entries that fired but did not fit the budget.
    pub over_budget: Vec<(usize, usize)>,
    /// Tokens of all `entries`.
    pub tokens: usize,
}

/// SplitMix64: tiny, seedable, good enough for dice.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Derives an independent stream seed from `a` and `b`.
fn mix(a: u64, b: u64) -> u64 {
    SplitMix64(SplitMix64(a).next() ^ b).next()
}

/// FNV-1a, so a group's pick depends on its name, not on its place.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn window(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Every 4-byte window of `text` with its position, sorted by window then
/// position: two stable counting passes, linear even in a debug build.
fn radix_index(text: &[u8]) -> Vec<(u32, u32)> {
    let mut items: Vec<(u32, u32)> = text
        .windows(4)
        .enumerate()
        .map(|(i, w)| (window(w), i as u32))
        .collect();
    let mut spare = vec![(0, 0); items.len()];
    for shift in [0u32, 16] {
        let digit = |w: u32| ((w >> shift) & 0xFFFF) as usize;
        let mut starts = vec![0usize; 1 << 16];
        for &(w, _) in &items {
            starts[digit(w)] += 1;
        }
        let mut total = 0;
        for s in starts.iter_mut() {
            (*s, total) = (total, total + *s);
        }
        for &(w, p) in &items {
            let d = digit(w);
            spare[starts[d]] = (w, p);
            starts[d] += 1;
        }
        std::mem::swap(&mut items, &mut spare);
    }
    items
}

/// Texts to search (chat messages newest first, or activated contents),
/// joined by NUL, with a sorted index of every 4-byte window so a key costs a
/// few binary searches instead of a pass over the text.
struct Haystack {
    text: String,
    starts: Vec<usize>,
    ends: Vec<usize>,
    grams: OnceCell<Vec<(u32, u32)>>,
}

impl Haystack {
    fn new(segments: impl Iterator<Item = String>) -> Self {
        let mut h = Self {
            text: String::new(),
            starts: Vec::new(),
            ends: Vec::new(),
            grams: OnceCell::new(),
        };
        for s in segments {
            if !h.starts.is_empty() {
                h.text.push('\0');
            }
            h.starts.push(h.text.len());
            // NUL separates segments, so no key can match across two.
            h.text.push_str(&s.replace('\0', " "));
            h.ends.push(h.text.len());
        }
        h
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    fn segment_at(&self, pos: usize) -> usize {
        self.ends.partition_point(|&e| e < pos)
    }

    fn grams(&self) -> Option<&[(u32, u32)]> {
        if u32::try_from(self.text.len()).is_err() {
            return None;
        }
        Some(self.grams.get_or_init(|| radix_index(self.text.as_bytes())))
    }

    fn word_bounded(&self, start: usize, end: usize) -> bool {
        !self.text[..start].chars().next_back().is_some_and(is_word)
            && !self.text[end..].chars().next().is_some_and(is_word)
    }

    /// The first (newest) of the first `limit` segments holding `needle`.
    fn find(&self, needle: &str, whole_word: bool, limit: usize) -> Option<usize> {
        let limit = limit.min(self.len());
        if needle.is_empty() || limit == 0 || needle.contains('\0') {
            return None;
        }
        let end = self.ends[limit - 1];
        let n = needle.len();
        let fits = |s: usize| !whole_word || self.word_bounded(s, s + n);
        let grams = self.grams().filter(|_| n >= 4);
        let Some(grams) = grams else {
            let hay = &self.text[..end];
            let mut from = 0;
            while let Some(p) = hay[from..].find(needle) {
                let s = from + p;
                if fits(s) {
                    return Some(self.segment_at(s));
                }
                from = s + hay[s..].chars().next().map_or(1, char::len_utf8);
            }
            return None;
        };
        // The rarest window of the needle has the fewest places to verify.
        let bytes = needle.as_bytes();
        let step = (n - 3).div_ceil(WINDOWS_TRIED).max(1);
        let mut best: Option<(usize, &[(u32, u32)])> = None;
        for o in (0..=n - 4).step_by(step) {
            let g = window(&bytes[o..o + 4]);
            let lo = grams.partition_point(|&(w, _)| w < g);
            let hi = lo + grams[lo..].partition_point(|&(w, _)| w == g);
            if lo == hi {
                return None;
            }
            if best.is_none_or(|(_, c)| hi - lo < c.len()) {
                best = Some((o, &grams[lo..hi]));
            }
        }
        let (o, places) = best?;
        let text = self.text.as_bytes();
        for &(_, p) in places {
            let Some(s) = (p as usize).checked_sub(o) else {
                continue;
            };
            if s + n > end {
                break;
            }
            if &text[s..s + n] == bytes && fits(s) {
                return Some(self.segment_at(s));
            }
        }
        None
    }

    fn find_regex(&self, re: &Regex, limit: usize) -> Option<usize> {
        (0..limit.min(self.len())).find(|&i| re.is_match(&self.text[self.starts[i]..self.ends[i]]))
    }
}

/// A haystack in both cases: lowercase for case-insensitive keys.
struct Texts {
    folded: Haystack,
    exact: Haystack,
}

impl Texts {
    fn new(segments: &[String]) -> Self {
        Self {
            folded: Haystack::new(segments.iter().map(|s| s.to_lowercase())),
            exact: Haystack::new(segments.iter().cloned()),
        }
    }
}

/// One key, ready to look for.
enum Matcher {
    Plain {
        needle: String,
        folded: bool,
        whole_word: bool,
    },
    Regex(Regex),
}

impl Matcher {
    fn find_in(&self, t: &Texts, limit: usize) -> Option<usize> {
        match self {
            Self::Plain {
                needle,
                folded,
                whole_word,
            } => {
                let hay = if *folded { &t.folded } else { &t.exact };
                hay.find(needle, *whole_word, limit)
            }
            Self::Regex(re) => t.exact.find_regex(re, limit),
        }
    }

    /// `(message, in activated content)` of the first place the key is found.
    fn find(&self, chat: &Texts, depth: usize, recursed: Option<&Texts>) -> Option<(usize, bool)> {
        self.find_in(chat, depth).map(|m| (m, false)).or_else(|| {
            recursed
                .and_then(|r| self.find_in(r, usize::MAX))
                .map(|_| (0, true))
        })
    }
}

/// `/pattern/flags` → (pattern, flags); `g` and `y` are accepted and mean nothing here.
fn slash_regex(key: &str) -> Option<(&str, &str)> {
    let rest = key.trim().strip_prefix('/')?;
    let close = rest.rfind('/')?;
    let (pattern, flags) = (&rest[..close], &rest[close + 1..]);
    (!pattern.is_empty() && flags.chars().all(|c| "imsuyg".contains(c))).then_some((pattern, flags))
}

/// Builds matchers, compiling each distinct regex once and at most [`MAX_REGEXES`].
#[derive(Default)]
struct Compiler {
    cache: HashMap<(String, String), Option<Regex>>,
}

impl Compiler {
    fn regex(&mut self, pattern: &str, flags: &str) -> Option<Regex> {
        let id = (pattern.to_owned(), flags.to_owned());
        if let Some(r) = self.cache.get(&id) {
            return r.clone();
        }
        if self.cache.len() >= MAX_REGEXES {
            return None;
        }
        let built = RegexBuilder::new(pattern)
            .case_insensitive(flags.contains('i'))
            .multi_line(flags.contains('m'))
            .dot_matches_new_line(flags.contains('s'))
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .ok();
        self.cache.insert(id, built.clone());
        built
    }

    fn matcher(
        &mut self,
        key: &str,
        folded: bool,
        whole_word: bool,
        use_regex: bool,
    ) -> Option<Matcher> {
        if key.trim().is_empty() {
            return None;
        }
        let compiled = match slash_regex(key) {
            Some((pattern, flags)) => self.regex(pattern, flags),
            None if use_regex => self.regex(key, if folded { "i" } else { "" }),
            None => None,
        };
        if let Some(re) = compiled {
            return Some(Matcher::Regex(re));
        }
        Some(Matcher::Plain {
            needle: if folded {
                key.to_lowercase()
            } else {
                key.to_owned()
            },
            folded,
            // Whole-word matching is for one-word keys; phrases stay substrings.
            whole_word: whole_word && key.split_whitespace().count() == 1,
        })
    }
}

/// An entry with its decorators applied and its keys compiled.
struct Prepared<'a> {
    book: usize,
    index: usize,
    entry: &'a Entry,
    content: &'a str,
    forced: bool,
    keys: Vec<(Cow<'a, str>, Matcher)>,
    secondary: Vec<(&'a str, Matcher)>,
    exclude: Vec<Matcher>,
    scan_depth: usize,
    position: Position,
    depth: usize,
    role: Role,
    groups: Vec<&'a str>,
    recursive_book: bool,
}

/// `None` for entries that cannot fire in this chat at all.
fn prepare<'a>(
    scan: &Scan,
    book: usize,
    index: usize,
    e: &'a Entry,
    compiler: &mut Compiler,
) -> Option<Prepared<'a>> {
    if !e.enabled {
        return None;
    }
    let lore = scan.books[book];
    let messages = scan.messages.len();
    let (decorators, content) = e.decorators();
    let mut p = Prepared {
        book,
        index,
        entry: e,
        content,
        forced: false,
        keys: Vec::new(),
        secondary: Vec::new(),
        exclude: Vec::new(),
        scan_depth: e.scan_depth.or(lore.scan_depth).unwrap_or(scan.scan_depth),
        position: e.position,
        depth: e.depth,
        role: e.role,
        groups: e
            .group
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .collect(),
        recursive_book: scan.recursive || lore.recursive_scanning,
    };
    let mut keys: Vec<Cow<'a, str>> = e.keys.iter().map(|k| Cow::Borrowed(k.as_str())).collect();
    let mut exclude: Vec<&str> = Vec::new();
    for d in &decorators {
        match d {
            Decorator::DontActivate => return None,
            Decorator::ActivateOnlyAfter(n) if messages <= *n => return None,
            Decorator::ActivateOnlyEvery(n) if *n == 0 || !messages.is_multiple_of(*n) => {
                return None;
            }
            Decorator::Activate => p.forced = true,
            Decorator::Depth(d) => (p.position, p.depth) = (Position::AtDepth, *d),
            Decorator::ReverseDepth(d) => {
                (p.position, p.depth) = (Position::AtDepth, messages.saturating_sub(*d));
            }
            Decorator::Position(name) => {
                if let Some(at) = Position::from_decorator(name) {
                    p.position = at;
                }
            }
            Decorator::Role(r) => p.role = *r,
            Decorator::ScanDepth(n) => p.scan_depth = *n,
            Decorator::AdditionalKeys(k) => keys.extend(k.iter().cloned().map(Cow::Owned)),
            Decorator::ExcludeKeys(k) => exclude.extend(k.iter().map(String::as_str)),
            Decorator::ActivateOnlyAfter(_)
            | Decorator::ActivateOnlyEvery(_)
            | Decorator::Other(_) => {}
        }
    }
    let folded = !e.case_sensitive.unwrap_or(scan.case_sensitive);
    let whole = e.match_whole_words.unwrap_or(scan.match_whole_words);
    let mut compile = |k: &str| compiler.matcher(k, folded, whole, e.use_regex);
    p.keys = keys
        .into_iter()
        .filter_map(|k| {
            let m = compile(&k)?;
            Some((k, m))
        })
        .collect();
    if p.keys.is_empty() && !e.constant && !p.forced {
        return None;
    }
    if e.selective {
        p.secondary = e
            .secondary_keys
            .iter()
            .filter_map(|k| Some((k.as_str(), compile(k)?)))
            .collect();
    }
    p.exclude = exclude.into_iter().filter_map(compile).collect();
    p.scan_depth = p.scan_depth.min(messages);
    Some(p)
}

impl Prepared<'_> {
    /// Why this entry fires against the texts of one pass, if it does.
    fn check(&self, chat: &Texts, recursed: Option<&Texts>) -> Option<Reason> {
        let find = |m: &Matcher| m.find(chat, self.scan_depth, recursed);
        if self.exclude.iter().any(|m| find(m).is_some()) {
            return None;
        }
        if self.forced {
            return Some(Reason::Decorator);
        }
        if self.entry.constant {
            return Some(Reason::Constant);
        }
        let (key, (message, _)) = self
            .keys
            .iter()
            .find_map(|(k, m)| find(m).map(|hit| (k, hit)))?;
        let mut secondary = None;
        if !self.secondary.is_empty() {
            let hit = |(_, m): &&(&str, Matcher)| find(m).is_some();
            let mut all = self.secondary.iter();
            match self.entry.logic {
                Logic::AndAny => secondary = Some(all.find(hit)?.0.to_owned()),
                Logic::NotAny if all.any(|s| hit(&s)) => return None,
                Logic::NotAll if all.all(|s| hit(&s)) => return None,
                Logic::AndAll if all.all(|s| hit(&s)) => {
                    secondary = Some(self.secondary[0].0.to_owned());
                }
                Logic::AndAll => return None,
                Logic::NotAny | Logic::NotAll => {}
            }
        }
        Some(Reason::Key {
            key: key.to_string(),
            secondary,
            message,
            recursion: recursed.is_some(),
        })
    }

    /// The probability roll, from a stream of its own so it never depends on other entries.
    fn rolls_in(&self, seed: u64) -> bool {
        let e = self.entry;
        if !e.use_probability || e.probability >= 100 {
            return true;
        }
        let mut rng = SplitMix64(mix(mix(seed, self.book as u64), e.id as u64));
        rng.next() % 100 < u64::from(e.probability)
    }
}

/// Keeps one winner per inclusion group among `fired` (indexes into `all`);
/// members of groups that already won in an earlier pass are dropped.
fn pick_groups(fired: &mut Vec<(usize, Reason)>, all: &[Prepared], won: &HashSet<&str>, seed: u64) {
    let mut keep = vec![true; fired.len()];
    let mut members: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (f, (i, _)) in fired.iter().enumerate() {
        for &g in &all[*i].groups {
            if won.contains(g) {
                keep[f] = false;
            }
            members
                .entry(g)
                .or_insert_with(|| {
                    order.push(g);
                    Vec::new()
                })
                .push(f);
        }
    }
    for g in order {
        let live: Vec<usize> = members[g].iter().copied().filter(|&f| keep[f]).collect();
        if live.len() < 2 {
            continue;
        }
        let entry = |f: usize| all[fired[f].0].entry;
        // Highest order among overrides, the first of equals.
        let winner = live
            .iter()
            .copied()
            .filter(|&f| entry(f).group_override)
            .fold(None, |best: Option<usize>, f| match best {
                Some(b) if entry(b).insertion_order >= entry(f).insertion_order => Some(b),
                _ => Some(f),
            })
            .unwrap_or_else(|| {
                let weights: Vec<u64> = live
                    .iter()
                    .map(|&f| u64::from(entry(f).group_weight))
                    .collect();
                let total: u64 = weights.iter().sum();
                let mut rng = SplitMix64(mix(seed, fnv(g)));
                if total == 0 {
                    return live[(rng.next() % live.len() as u64) as usize];
                }
                let mut roll = rng.next() % total;
                for (&f, &w) in live.iter().zip(&weights) {
                    if roll < w {
                        return f;
                    }
                    roll -= w;
                }
                live[live.len() - 1]
            });
        for f in live {
            keep[f] = f == winner;
        }
    }
    let mut k = keep.into_iter();
    fired.retain(|_| k.next().unwrap_or(false));
}

/// Which entries of `scan.books` fire for the next reply; `count` measures content in tokens.
pub fn activate(scan: &Scan, count: impl Fn(&str) -> usize) -> Activation {
    let mut compiler = Compiler::default();
    let mut all: Vec<Prepared> = Vec::new();
    for (b, book) in scan.books.iter().enumerate() {
        for (i, e) in book.entries.iter().enumerate() {
            all.extend(prepare(scan, b, i, e, &mut compiler));
        }
    }
    // Only as many messages as the deepest-scanning entry needs, each lowercased once.
    let deepest = all.iter().map(|p| p.scan_depth).max().unwrap_or(0);
    let lines: Vec<String> = scan
        .messages
        .iter()
        .rev()
        .take(deepest)
        .map(|m| {
            if m.name.is_empty() {
                m.text.to_owned()
            } else {
                format!("{}: {}", m.name, m.text)
            }
        })
        .collect();
    let chat = Texts::new(&lines);
    let recursion_on = scan.recursive || scan.books.iter().any(|b| b.recursive_scanning);

    let mut out = Activation::default();
    let mut done = vec![false; all.len()];
    let mut checked = vec![false; all.len()];
    let mut book_tokens = vec![0usize; scan.books.len()];
    let mut book_full = vec![false; scan.books.len()];
    let mut won: HashSet<&str> = HashSet::new();
    let mut recursed_text: Vec<String> = Vec::new();
    let mut fresh = false;
    let mut overflowed = false;
    for pass in 0..=scan.max_recursion {
        let recursion = pass > 0;
        if recursion {
            let delayed = pass == 1
                && all.iter().zip(&done).any(|(p, d)| {
                    !d && p.recursive_book
                        && p.entry.delay_until_recursion
                        && !p.entry.exclude_recursion
                });
            if !recursion_on || overflowed || !(fresh || delayed) {
                break;
            }
        }
        let recursed = recursion.then(|| Texts::new(&recursed_text));
        let mut fired: Vec<(usize, Reason)> = Vec::new();
        for (i, p) in all.iter().enumerate() {
            let eligible = if recursion {
                p.recursive_book && !p.entry.exclude_recursion
            } else {
                !p.entry.delay_until_recursion
            };
            if done[i] || !eligible {
                continue;
            }
            // An entry already checked can only change its mind if one of its
            // keys is in the new text (an exclude key can only keep it off).
            if let Some(r) = recursed.as_ref().filter(|_| checked[i])
                && !p
                    .keys
                    .iter()
                    .map(|(_, m)| m)
                    .chain(p.secondary.iter().map(|(_, m)| m))
                    .any(|m| m.find_in(r, usize::MAX).is_some())
            {
                continue;
            }
            checked[i] = true;
            if let Some(r) = p.check(&chat, recursed.as_ref()) {
                done[i] = true;
                fired.push((i, r));
            }
        }
        pick_groups(&mut fired, &all, &won, scan.seed);
        fired.retain(|(i, _)| all[*i].rolls_in(scan.seed));
        // Budget order: always-on entries first, then highest priority.
        let always = |r: &Reason| matches!(r, Reason::Constant | Reason::Decorator);
        fired.sort_by_key(|(i, r)| {
            let p = &all[*i];
            (
                !always(r),
                std::cmp::Reverse(p.entry.priority.unwrap_or(p.entry.insertion_order)),
                p.book,
                p.index,
            )
        });
        fresh = false;
        for (i, reason) in fired {
            let p = &all[i];
            if overflowed || book_full[p.book] {
                out.over_budget.push((p.book, p.index));
                continue;
            }
            let tokens = count(p.content);
            if out.tokens.saturating_add(tokens) > scan.budget {
                overflowed = true;
                out.over_budget.push((p.book, p.index));
                continue;
            }
            let cap = scan.books[p.book].token_budget.unwrap_or(usize::MAX);
            if book_tokens[p.book].saturating_add(tokens) > cap {
                book_full[p.book] = true;
                out.over_budget.push((p.book, p.index));
                continue;
            }
            out.tokens += tokens;
            book_tokens[p.book] += tokens;
            won.extend(p.groups.iter().copied());
            if !p.entry.prevent_recursion {
                recursed_text.push(p.content.to_owned());
                fresh = true;
            }
            out.entries.push(Activated {
                book: p.book,
                entry: p.index,
                id: p.entry.id,
                comment: p.entry.comment.clone(),
                content: p.content.to_owned(),
                position: p.position,
                depth: p.depth,
                role: p.role,
                order: p.entry.insertion_order,
                tokens,
                reason,
            });
        }
    }
    out.entries.sort_by_key(|a| (a.order, a.book, a.entry));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Oldest first: "dragons" is message 2, "Moon" 1, "cat" 0 (the newest).
    const CHAT: &[&str] = &[
        "An old legend about dragons.",
        "I looked at the Moon tonight.",
        "The cat sat on the catalog mat.",
    ];

    fn e(id: i64, keys: &[&str], content: &str) -> Entry {
        Entry {
            id,
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            content: content.into(),
            ..Entry::default()
        }
    }

    fn words(t: &str) -> usize {
        t.split_whitespace().count()
    }

    fn run_with(
        entries: Vec<Entry>,
        chat: &[&str],
        book: impl Fn(&mut Lorebook),
        tweak: impl Fn(&mut Scan),
    ) -> Activation {
        let mut lore = Lorebook {
            entries,
            ..Lorebook::default()
        };
        book(&mut lore);
        let books = [&lore];
        let messages: Vec<ScanMessage> = chat
            .iter()
            .map(|t| ScanMessage {
                name: "Ann",
                text: t,
            })
            .collect();
        let mut scan = Scan {
            books: &books,
            messages: &messages,
            budget: 1000,
            ..Scan::default()
        };
        tweak(&mut scan);
        activate(&scan, words)
    }

    fn ids(a: &Activation) -> Vec<i64> {
        a.entries.iter().map(|x| x.id).collect()
    }

    struct Row {
        name: &'static str,
        entries: Vec<Entry>,
        chat: &'static [&'static str],
        book: fn(&mut Lorebook),
        scan: fn(&mut Scan),
        fired: &'static [i64],
        over: &'static [(usize, usize)],
    }

    fn row(name: &'static str, entries: Vec<Entry>, fired: &'static [i64]) -> Row {
        Row {
            name,
            entries,
            chat: CHAT,
            book: |_| {},
            scan: |_| {},
            fired,
            over: &[],
        }
    }

    fn secondary(id: i64, logic: Logic, keys: &[&str]) -> Entry {
        Entry {
            secondary_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            logic,
            ..e(id, &["moon"], "x")
        }
    }

    fn rec(entries: Vec<Entry>, fired: &'static [i64], name: &'static str) -> Row {
        Row {
            scan: |s| s.recursive = true,
            ..row(name, entries, fired)
        }
    }

    fn grouped(id: i64, group: &str, over: bool, order: i64, weight: u32) -> Entry {
        Entry {
            group: group.into(),
            group_override: over,
            insertion_order: order,
            group_weight: weight,
            ..e(id, &["moon"], "x")
        }
    }

    fn costly(id: i64, words: usize, priority: Option<i64>, order: i64) -> Entry {
        Entry {
            priority,
            insertion_order: order,
            ..e(id, &["moon"], &vec!["w"; words].join(" "))
        }
    }

    #[test]
    fn activation_rules() {
        let rows = vec![
            row(
                "disabled never fires",
                vec![Entry {
                    enabled: false,
                    ..e(1, &["moon"], "x")
                }],
                &[],
            ),
            row(
                "no keys, not constant: never fires",
                vec![e(1, &[], "x"), e(2, &["", " "], "x")],
                &[],
            ),
            row(
                "substring, any case",
                vec![e(1, &["MOON"], "x"), e(2, &["tal"], "x")],
                &[1, 2],
            ),
            row(
                "entry case-sensitive",
                vec![Entry {
                    case_sensitive: Some(true),
                    ..e(1, &["moon"], "x")
                }],
                &[],
            ),
            Row {
                scan: |s| s.case_sensitive = true,
                ..row(
                    "global case-sensitive",
                    vec![e(1, &["moon"], "x"), e(2, &["Moon"], "x")],
                    &[2],
                )
            },
            Row {
                scan: |s| s.case_sensitive = true,
                ..row(
                    "entry overrides global case",
                    vec![Entry {
                        case_sensitive: Some(false),
                        ..e(1, &["moon"], "x")
                    }],
                    &[1],
                )
            },
            row(
                "whole words: one-word keys",
                vec![
                    Entry {
                        match_whole_words: Some(true),
                        ..e(1, &["tal"], "x")
                    },
                    Entry {
                        match_whole_words: Some(true),
                        ..e(2, &["cat"], "x")
                    },
                ],
                &[2],
            ),
            row(
                "whole words: phrases stay substrings",
                vec![Entry {
                    match_whole_words: Some(true),
                    ..e(1, &["at the mo"], "x")
                }],
                &[1],
            ),
            Row {
                scan: |s| s.match_whole_words = true,
                ..row(
                    "global whole words",
                    vec![e(1, &["tal"], "x"), e(2, &["catalog"], "x")],
                    &[2],
                )
            },
            row("regex key", vec![e(1, &["/m[o0]{2}n\\b/i"], "x")], &[1]),
            row(
                "regex without i is case-sensitive",
                vec![e(1, &["/MOON/"], "x")],
                &[],
            ),
            Row {
                chat: &["He typed /(x/ twice."],
                ..row(
                    "invalid regex is plain text",
                    vec![e(1, &["/(x/"], "x"), e(2, &["/(y/"], "x")],
                    &[1],
                )
            },
            row(
                "use_regex makes every key a regex",
                vec![
                    Entry {
                        use_regex: true,
                        ..e(1, &["m.on"], "x")
                    },
                    e(2, &["m.on"], "x"),
                ],
                &[1],
            ),
            row(
                "secondary logic",
                vec![
                    secondary(1, Logic::AndAny, &["cat", "zebra"]),
                    secondary(2, Logic::AndAny, &["zebra"]),
                    secondary(3, Logic::NotAll, &["cat", "zebra"]),
                    secondary(4, Logic::NotAll, &["cat", "moon"]),
                    secondary(5, Logic::NotAny, &["zebra"]),
                    secondary(6, Logic::NotAny, &["cat"]),
                    secondary(7, Logic::AndAll, &["cat", "moon"]),
                    secondary(8, Logic::AndAll, &["cat", "zebra"]),
                    Entry {
                        selective: false,
                        ..secondary(9, Logic::AndAll, &["zebra"])
                    },
                ],
                &[1, 3, 5, 7, 9],
            ),
            row(
                "constant fires without keys",
                vec![Entry {
                    constant: true,
                    ..e(1, &[], "x")
                }],
                &[1],
            ),
            row(
                "@@activate forces on, @@dont_activate off",
                vec![
                    e(1, &[], "@@activate\nx"),
                    Entry {
                        constant: true,
                        ..e(2, &["moon"], "@@dont_activate\nx")
                    },
                ],
                &[1],
            ),
            row(
                "@@activate_only_after counts messages",
                vec![
                    e(1, &["moon"], "@@activate_only_after 2\nx"),
                    e(2, &["moon"], "@@activate_only_after 3\nx"),
                ],
                &[1],
            ),
            row(
                "@@activate_only_every",
                vec![
                    e(1, &["moon"], "@@activate_only_every 3\nx"),
                    e(2, &["moon"], "@@activate_only_every 2\nx"),
                ],
                &[1],
            ),
            row(
                "@@scan_depth reaches further",
                vec![
                    e(1, &["dragons"], "@@scan_depth 3\nx"),
                    e(2, &["dragons"], "x"),
                ],
                &[1],
            ),
            row(
                "@@additional_keys",
                vec![e(1, &["zebra"], "@@additional_keys lion, cat\nx")],
                &[1],
            ),
            row(
                "@@exclude_keys keeps it off, constant or not",
                vec![
                    e(1, &["moon"], "@@exclude_keys zebra, cat\nx"),
                    Entry {
                        constant: true,
                        ..e(2, &[], "@@exclude_keys cat\nx")
                    },
                    e(3, &["moon"], "@@exclude_keys zebra\nx"),
                ],
                &[3],
            ),
            row(
                "default scan depth is 2",
                vec![e(1, &["dragons"], "x")],
                &[],
            ),
            Row {
                scan: |s| s.scan_depth = 3,
                ..row(
                    "scan depth from the scan",
                    vec![e(1, &["dragons"], "x")],
                    &[1],
                )
            },
            Row {
                book: |b| b.scan_depth = Some(3),
                ..row("book scan depth wins", vec![e(1, &["dragons"], "x")], &[1])
            },
            Row {
                book: |b| b.scan_depth = Some(3),
                ..row(
                    "entry scan depth wins over the book's",
                    vec![Entry {
                        scan_depth: Some(1),
                        ..e(1, &["moon"], "x")
                    }],
                    &[],
                )
            },
            row(
                "recursion off by default",
                vec![e(1, &["moon"], "the silver key"), e(2, &["silver"], "x")],
                &[1],
            ),
            rec(
                vec![e(1, &["moon"], "the silver key"), e(2, &["silver"], "x")],
                &[1, 2],
                "recursion",
            ),
            Row {
                book: |b| b.recursive_scanning = true,
                ..row(
                    "book turns recursion on",
                    vec![e(1, &["moon"], "silver"), e(2, &["silver"], "x")],
                    &[1, 2],
                )
            },
            rec(
                vec![
                    Entry {
                        prevent_recursion: true,
                        ..e(1, &["moon"], "silver")
                    },
                    e(2, &["silver"], "x"),
                ],
                &[1],
                "prevent_recursion",
            ),
            rec(
                vec![
                    e(1, &["moon"], "silver"),
                    Entry {
                        exclude_recursion: true,
                        ..e(2, &["silver"], "x")
                    },
                ],
                &[1],
                "exclude_recursion",
            ),
            rec(
                vec![Entry {
                    delay_until_recursion: true,
                    ..e(1, &["cat"], "x")
                }],
                &[1],
                "delayed entries fire in a recursion pass",
            ),
            row(
                "delayed entries need recursion",
                vec![Entry {
                    delay_until_recursion: true,
                    ..e(1, &["cat"], "x")
                }],
                &[],
            ),
            Row {
                scan: |s| (s.recursive, s.max_recursion) = (true, 2),
                ..row(
                    "recursion is bounded",
                    vec![
                        e(1, &["moon"], "alpha"),
                        e(2, &["alpha"], "beta"),
                        e(3, &["beta"], "gamma"),
                        e(4, &["gamma"], "x"),
                    ],
                    &[1, 2, 3],
                )
            },
            row(
                "group override wins, highest order",
                vec![
                    grouped(1, "g", false, 300, 100),
                    grouped(2, "g", true, 100, 100),
                    grouped(3, "g", true, 200, 100),
                ],
                &[3],
            ),
            row(
                "weight 0 never wins its group",
                vec![grouped(1, "g", false, 1, 0), grouped(2, "g", false, 2, 100)],
                &[2],
            ),
            row(
                "comma-separated groups",
                vec![
                    grouped(1, "a, b", true, 1, 100),
                    grouped(2, "a", false, 2, 100),
                    grouped(3, "b", false, 3, 100),
                    grouped(4, "c", false, 4, 100),
                ],
                &[1, 4],
            ),
            rec(
                vec![
                    Entry {
                        group: "g".into(),
                        ..e(1, &["moon"], "silver")
                    },
                    Entry {
                        group: "g".into(),
                        ..e(2, &["silver"], "x")
                    },
                ],
                &[1],
                "a group won earlier stays won",
            ),
            row(
                "probability 0 never, off means always",
                vec![
                    Entry {
                        probability: 0,
                        ..e(1, &["moon"], "x")
                    },
                    Entry {
                        probability: 0,
                        use_probability: false,
                        ..e(2, &["moon"], "x")
                    },
                    Entry {
                        probability: 0,
                        constant: true,
                        ..e(3, &[], "x")
                    },
                ],
                &[2],
            ),
            Row {
                scan: |s| s.budget = 5,
                over: &[(0, 1)],
                ..row(
                    "budget drops the lowest priority",
                    vec![costly(1, 3, Some(10), 1), costly(2, 3, Some(1), 2)],
                    &[1],
                )
            },
            Row {
                scan: |s| s.budget = 5,
                over: &[(0, 0)],
                ..row(
                    "constants first",
                    vec![
                        costly(1, 3, Some(100), 1),
                        Entry {
                            constant: true,
                            ..costly(2, 3, Some(0), 2)
                        },
                    ],
                    &[2],
                )
            },
            Row {
                scan: |s| s.budget = 5,
                over: &[(0, 1), (0, 2)],
                ..row(
                    "once over budget, nothing more",
                    vec![
                        costly(1, 4, Some(3), 1),
                        costly(2, 3, Some(2), 2),
                        costly(3, 1, Some(1), 3),
                    ],
                    &[1],
                )
            },
            Row {
                scan: |s| s.budget = 5,
                over: &[(0, 0)],
                ..row(
                    "no priority: insertion order decides",
                    vec![costly(1, 3, None, 10), costly(2, 3, None, 20)],
                    &[2],
                )
            },
            Row {
                book: |b| b.token_budget = Some(3),
                over: &[(0, 1)],
                ..row(
                    "book budget caps the book",
                    vec![costly(1, 3, Some(2), 1), costly(2, 3, Some(1), 2)],
                    &[1],
                )
            },
            Row {
                scan: |s| (s.recursive, s.budget) = (true, 1),
                over: &[(0, 1)],
                ..row(
                    "over budget stops recursion",
                    vec![
                        e(1, &["moon"], "silver"),
                        e(2, &["cat"], "x"),
                        e(3, &["silver"], "x"),
                    ],
                    &[1],
                )
            },
            row(
                "sorted by insertion order",
                vec![
                    costly(1, 1, None, 30),
                    costly(2, 1, None, 10),
                    costly(3, 1, None, 20),
                    costly(4, 1, None, 10),
                ],
                &[2, 4, 3, 1],
            ),
        ];
        for r in rows {
            let got = run_with(r.entries, r.chat, r.book, r.scan);
            assert_eq!(ids(&got), r.fired, "{}", r.name);
            assert_eq!(got.over_budget, r.over, "{}: over budget", r.name);
            let sum: usize = got.entries.iter().map(|a| a.tokens).sum();
            assert_eq!(got.tokens, sum, "{}: tokens", r.name);
        }
    }

    #[test]
    fn reasons_and_placement() {
        let key =
            |key: &str, secondary: Option<&str>, message: usize, recursion: bool| Reason::Key {
                key: key.into(),
                secondary: secondary.map(Into::into),
                message,
                recursion,
            };
        let rows: Vec<(&str, Entry, Reason, Position, usize, Role, &str)> = vec![
            (
                "key in message 1",
                e(1, &["zebra", "moon"], "x"),
                key("moon", None, 1, false),
                Position::BeforeChar,
                4,
                Role::System,
                "x",
            ),
            (
                "secondary recorded",
                Entry {
                    secondary_keys: vec!["moon".into()],
                    ..e(1, &["cat"], "x")
                },
                key("cat", Some("moon"), 0, false),
                Position::BeforeChar,
                4,
                Role::System,
                "x",
            ),
            (
                "constant",
                Entry {
                    constant: true,
                    ..e(1, &[], "x")
                },
                Reason::Constant,
                Position::BeforeChar,
                4,
                Role::System,
                "x",
            ),
            (
                "@@activate",
                e(1, &[], "@@activate\nLore"),
                Reason::Decorator,
                Position::BeforeChar,
                4,
                Role::System,
                "Lore",
            ),
            (
                "@@depth",
                e(1, &["cat"], "@@depth 2\nx"),
                key("cat", None, 0, false),
                Position::AtDepth,
                2,
                Role::System,
                "x",
            ),
            (
                "@@reverse_depth",
                e(1, &["cat"], "@@reverse_depth 1\nx"),
                key("cat", None, 0, false),
                Position::AtDepth,
                2,
                Role::System,
                "x",
            ),
            (
                "@@role",
                e(1, &["cat"], "@@role user\nx"),
                key("cat", None, 0, false),
                Position::BeforeChar,
                4,
                Role::User,
                "x",
            ),
            (
                "@@position after_desc",
                e(1, &["cat"], "@@position after_desc\nx"),
                key("cat", None, 0, false),
                Position::AfterChar,
                4,
                Role::System,
                "x",
            ),
            (
                "@@position before_desc",
                Entry {
                    position: Position::AfterChar,
                    ..e(1, &["cat"], "@@position before_desc\nx")
                },
                key("cat", None, 0, false),
                Position::BeforeChar,
                4,
                Role::System,
                "x",
            ),
            (
                "@@position personality",
                e(1, &["cat"], "@@position personality\nx"),
                key("cat", None, 0, false),
                Position::AfterChar,
                4,
                Role::System,
                "x",
            ),
            (
                "@@position scenario",
                e(1, &["cat"], "@@position scenario\nx"),
                key("cat", None, 0, false),
                Position::AfterChar,
                4,
                Role::System,
                "x",
            ),
            (
                "@@@ fallback",
                e(1, &["cat"], "@@position pt_main\n@@@position after_desc\nx"),
                key("cat", None, 0, false),
                Position::AfterChar,
                4,
                Role::System,
                "x",
            ),
            (
                "entry placement without decorators",
                Entry {
                    position: Position::AtDepth,
                    depth: 0,
                    role: Role::Assistant,
                    ..e(1, &["cat"], "x")
                },
                key("cat", None, 0, false),
                Position::AtDepth,
                0,
                Role::Assistant,
                "x",
            ),
        ];
        for (name, entry, reason, position, depth, role, content) in rows {
            let got = run_with(vec![entry], CHAT, |_| {}, |_| {});
            let [a] = got.entries.as_slice() else {
                panic!("{name}: {got:?}");
            };
            assert_eq!(
                (&a.reason, a.position, a.depth, a.role, a.content.as_str()),
                (&reason, position, depth, role, content),
                "{name}"
            );
        }
        let chained = run_with(
            vec![e(1, &["moon"], "silver"), e(2, &["silver"], "x")],
            CHAT,
            |_| {},
            |s| s.recursive = true,
        );
        assert_eq!(chained.entries[1].reason, key("silver", None, 0, true));
    }

    #[test]
    fn several_books_share_the_budget() {
        let a = Lorebook {
            entries: vec![costly(1, 3, Some(1), 1)],
            ..Lorebook::default()
        };
        let b = Lorebook {
            entries: vec![costly(2, 3, Some(5), 1), costly(3, 1, Some(0), 0)],
            ..Lorebook::default()
        };
        let books = [&a, &b];
        let messages = [ScanMessage {
            name: "",
            text: "moon",
        }];
        let scan = Scan {
            books: &books,
            messages: &messages,
            budget: 5,
            ..Scan::default()
        };
        let got = activate(&scan, words);
        let placed: Vec<(usize, usize)> = got.entries.iter().map(|x| (x.book, x.entry)).collect();
        assert_eq!(
            (placed, got.over_budget, got.tokens),
            (vec![(1, 0)], vec![(0, 0), (1, 1)], 3)
        );
    }

    fn probable(id: i64, p: u32) -> Entry {
        Entry {
            probability: p,
            ..e(id, &["moon"], "x")
        }
    }

    fn fires(entries: Vec<Entry>, seed: u64, id: i64) -> bool {
        let got = run_with(entries, CHAT, |_| {}, |s| s.seed = seed);
        got.entries.iter().any(|a| a.id == id)
    }

    #[test]
    fn probability_is_seeded_and_fair() {
        for seed in [0, 1, 99, u64::MAX] {
            let first = fires(vec![probable(7, 50)], seed, 7);
            assert_eq!(
                fires(vec![probable(7, 50)], seed, 7),
                first,
                "same seed, same roll"
            );
            // Another entry's presence does not change this entry's roll.
            assert_eq!(
                fires(vec![probable(3, 50), probable(7, 50)], seed, 7),
                first,
                "independent"
            );
        }
        let hits = (0..1000)
            .filter(|&seed| fires(vec![probable(7, 30)], seed, 7))
            .count();
        assert!((200..=400).contains(&hits), "30% fired {hits} of 1000");
        let constants = (0..1000)
            .filter(|&seed| {
                fires(
                    vec![Entry {
                        constant: true,
                        ..probable(7, 30)
                    }],
                    seed,
                    7,
                )
            })
            .count();
        assert!(
            (200..=400).contains(&constants),
            "constants roll too: {constants}"
        );
    }

    #[test]
    fn group_pick_is_seeded_and_weighted() {
        let members = || {
            (1..=3)
                .map(|id| grouped(id, "g", false, id, [10, 30, 60][id as usize - 1]))
                .collect::<Vec<_>>()
        };
        let mut wins = [0usize; 3];
        for seed in 0..1000 {
            let got = run_with(members(), CHAT, |_| {}, |s| s.seed = seed);
            let again = run_with(members(), CHAT, |_| {}, |s| s.seed = seed);
            assert_eq!(ids(&got), ids(&again), "reproducible");
            let [a] = got.entries.as_slice() else {
                panic!("one winner, got {got:?}");
            };
            wins[a.id as usize - 1] += 1;
        }
        assert!(
            wins[0] < wins[1] && wins[1] < wins[2],
            "weights 10/30/60 won {wins:?}"
        );
    }

    #[test]
    fn serializes_for_the_chat_view() {
        let got = run_with(vec![e(1, &["moon"], "x")], CHAT, |_| {}, |_| {});
        let v = serde_json::to_value(&got).unwrap();
        assert_eq!(v["entries"][0]["reason"]["kind"], "key");
        assert_eq!(v["entries"][0]["position"], "before_char");
        let back: Activation = serde_json::from_value(v).unwrap();
        assert_eq!(back, got);
    }

    #[test]
    fn hostile_books_finish_fast() {
        let mut rng = SplitMix64(7);
        let mut word = |len: usize| -> String {
            (0..len)
                .map(|_| (b'a' + (rng.next() % 26) as u8) as char)
                .collect()
        };
        let messages: Vec<String> = (0..50)
            .map(|_| {
                let mut m = String::new();
                while m.len() < 2048 {
                    let len = 3 + m.len() % 7;
                    m.push_str(&word(len));
                    m.push(' ');
                }
                m
            })
            .collect();
        let content = "lore ".repeat(2000);
        let entries: Vec<Entry> = (0..10_000)
            .map(|i| Entry {
                keys: (0..5)
                    .map(|k| {
                        if i % 1000 == 0 && k == 4 {
                            "moon".into()
                        } else {
                            word(8)
                        }
                    })
                    .collect(),
                secondary_keys: vec![word(6)],
                logic: Logic::NotAny,
                content: content.clone(),
                ..e(i, &[], "")
            })
            .collect();
        let mut lore = Lorebook {
            entries,
            ..Lorebook::default()
        };
        lore.entries[0].content = "@@activate\nx".into();
        let mut scan_messages: Vec<ScanMessage> = messages
            .iter()
            .map(|t| ScanMessage {
                name: "Ann",
                text: t,
            })
            .collect();
        scan_messages.push(ScanMessage {
            name: "Bob",
            text: "the moon",
        });
        // The default depth, then every message.
        for depth in [None, Some(60)] {
            lore.scan_depth = depth;
            let books = [&lore];
            let scan = Scan {
                books: &books,
                messages: &scan_messages,
                recursive: true,
                budget: 100_000,
                ..Scan::default()
            };
            let start = std::time::Instant::now();
            let got = activate(&scan, words);
            let took = start.elapsed();
            assert_eq!(got.entries.len(), 10, "depth {depth:?}");
            assert!(
                took < std::time::Duration::from_secs(1),
                "depth {depth:?} took {took:?}"
            );
        }
    }
}
