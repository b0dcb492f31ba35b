//! The macros SillyTavern expands in card text (`{{char}}`, `{{random:a,b}}`,
//! `{{roll:2d6}}`, `{{// comment}}`, ...), expanded in one linear pass.
//!
//! Rules:
//! - A macro is `{{body}}` where the body holds no `{{`; the first `}}` closes
//!   it. In a run of braces (`{{{char}}`) the macro opens at the last two.
//! - Names match in any case (`{{Char}}`, `{{MESEXAMPLES}}`); the old forms
//!   `<BOT>`, `<CHAR>` and `<USER>` too.
//! - Anything not understood (an unknown name, bad arguments, dice out of
//!   bounds, a `{{` never closed) stays exactly as written.
//! - Nothing is expanded recursively: the values of `{{description}}`,
//!   `{{personality}}`, `{{scenario}}`, `{{persona}}`, `{{mesExamples}}`,
//!   `{{lastMessage}}` and `{{original}}` get their `{{char}}` / `{{user}}` /
//!   `<BOT>` names replaced, once, and nothing else; items of `{{random}}` and
//!   `{{pick}}` are inserted as written.
//! - Randomness is a splitmix64 stream seeded from the context, so the same
//!   seeds always give the same text.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, FixedOffset, Utc};

/// What macros expand to in one piece of text.
#[derive(Debug, Clone, Copy)]
pub struct MacroContext<'a> {
    /// `{{char}}`: the V3 nickname when the card sets one (the caller decides).
    pub char_name: &'a str,
    /// `{{user}}`: the user persona's name.
    pub user_name: &'a str,
    /// `{{original}}`: the app's global text; `Some` only while expanding a
    /// card's `system_prompt` or `post_history_instructions`.
    pub original: Option<&'a str>,
    /// The local time for `{{time}}`, `{{date}}` and friends.
    pub now: DateTime<FixedOffset>,
    /// Seeds `{{random}}` and `{{roll}}`: a new reply (regenerate) passes a new
    /// seed, the same seed rolls the same.
    pub reply_seed: u64,
    /// Seeds `{{pick}}`: the same for the whole chat.
    pub chat_seed: u64,
    /// `{{description}}`.
    pub description: &'a str,
    /// `{{personality}}`.
    pub personality: &'a str,
    /// `{{scenario}}`.
    pub scenario: &'a str,
    /// `{{persona}}`: the user persona's description.
    pub persona: &'a str,
    /// `{{mesExamples}}`.
    pub mes_examples: &'a str,
    /// `{{lastMessage}}`: the chat's latest message.
    pub last_message: &'a str,
}

impl<'a> MacroContext<'a> {
    /// A context with only the two names: empty fields, no `{{original}}`,
    /// seeds 0 and the Unix epoch (UTC) as `now`; set the rest as needed.
    pub fn new(char_name: &'a str, user_name: &'a str) -> Self {
        Self {
            char_name,
            user_name,
            original: None,
            now: DateTime::<Utc>::UNIX_EPOCH.fixed_offset(),
            reply_seed: 0,
            chat_seed: 0,
            description: "",
            personality: "",
            scenario: "",
            persona: "",
            mes_examples: "",
            last_message: "",
        }
    }
}

/// Expands every macro of `text` (see the module rules).
pub fn expand(text: &str, ctx: &MacroContext) -> String {
    let mut out = Out {
        text: String::with_capacity(text.len()),
        trim_next: false,
    };
    // Occurrences so far of each macro body: identical macros at different places draw apart.
    let mut seen: HashMap<&str, u64> = HashMap::new();
    let mut ordinal = |body| {
        let n = seen.entry(body).or_insert(0);
        *n += 1;
        *n - 1
    };
    scan(text, |piece| match piece {
        Piece::Text(t) => out.push(t),
        Piece::Angle { who, .. } => out.push(ctx.name(who)),
        Piece::Curly { raw, body } => match parse(body) {
            None => out.push(raw),
            Some(Kind::Char) => out.push(ctx.char_name),
            Some(Kind::User) => out.push(ctx.user_name),
            Some(Kind::Original) => match ctx.original {
                Some(o) => out.push(&ctx.names(o)),
                None => out.push(raw),
            },
            Some(Kind::Field(f)) => out.push(&ctx.names(ctx.field(f))),
            Some(Kind::Clock(c)) => out.push(&ctx.now.format(c.pattern()).to_string()),
            Some(Kind::Random(list)) => {
                let mut rng = Rng::for_macro(ctx.reply_seed, body, ordinal(body));
                out.push(&list.choose(&mut rng));
            }
            Some(Kind::Pick(list)) => {
                let mut rng = Rng::for_macro(ctx.chat_seed, body, ordinal(body));
                out.push(&list.choose(&mut rng));
            }
            Some(Kind::Roll(dice)) => {
                let mut rng = Rng::for_macro(ctx.reply_seed, body, ordinal(body));
                out.push(&dice.roll(&mut rng).to_string());
            }
            Some(Kind::Comment | Kind::Noop) => {}
            Some(Kind::Newline) => out.push("\n"),
            Some(Kind::Trim) => out.trim(),
        },
    });
    out.text
}

/// Whether `text` has a macro whose value changes from reply to reply or over
/// time: `{{random}}`, `{{roll}}`, `{{time}}`, `{{date}}`, `{{weekday}}`,
/// `{{isotime}}`, `{{isodate}}`, and `{{lastMessage}}` (new on every turn).
pub fn has_volatile(text: &str) -> bool {
    let mut found = false;
    scan_until(text, |piece| {
        if let Piece::Curly { body, .. } = piece {
            found = parse(body).is_some_and(|k| k.is_volatile());
        }
        !found
    });
    found
}

/// The volatile macros of `text` (see [`has_volatile`]) as written, each once, in order.
pub fn volatile_macros(text: &str) -> Vec<&str> {
    collect(text, |body| parse(body).is_some_and(|k| k.is_volatile()))
}

/// The `{{…}}` macros of `text` that stay as written because they are not
/// understood (unknown names, bad arguments, dice out of bounds), each once,
/// in order. `original` says whether `{{original}}` works in this text (a
/// card's system prompt or post-history instructions). Empty `{{}}` is skipped.
pub fn unknown_macros(text: &str, original: bool) -> Vec<&str> {
    collect(text, |body| {
        !body.trim().is_empty()
            && match parse(body) {
                None => true,
                Some(Kind::Original) => !original,
                Some(_) => false,
            }
    })
}

/// Replaces `{{char}}` and `{{user}}` (any case) and the old `<BOT>` and
/// `<USER>` (exact case), and nothing else: what `prompt::replace_macros` does.
pub fn replace_names(text: &str, char_name: &str, user_name: &str) -> String {
    names(text, char_name, user_name, false)
}

/// The distinct raw macros of `text` whose body passes `keep`.
fn collect(text: &str, keep: impl Fn(&str) -> bool) -> Vec<&str> {
    let mut found: Vec<&str> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    scan(text, |piece| {
        if let Piece::Curly { raw, body } = piece
            && keep(body)
            && seen.insert(raw)
        {
            found.push(raw);
        }
    });
    found
}

/// Names only: `{{char}}`/`{{user}}` in any case; the angle forms in any
/// case when `any_case_angles`, else only `<BOT>` and `<USER>`.
fn names(text: &str, char_name: &str, user_name: &str, any_case_angles: bool) -> String {
    let mut out = String::with_capacity(text.len());
    let name = |who| match who {
        Who::Char => char_name,
        Who::User => user_name,
    };
    scan(text, |piece| match piece {
        Piece::Text(t) => out.push_str(t),
        Piece::Angle { raw, who } => {
            if any_case_angles || raw == "<BOT>" || raw == "<USER>" {
                out.push_str(name(who));
            } else {
                out.push_str(raw);
            }
        }
        Piece::Curly { body, .. } if body.eq_ignore_ascii_case("char") => out.push_str(char_name),
        Piece::Curly { body, .. } if body.eq_ignore_ascii_case("user") => out.push_str(user_name),
        Piece::Curly { body, .. } => {
            // A body holds no `{{`, so this recursion is one level deep.
            out.push_str("{{");
            out.push_str(&names(body, char_name, user_name, any_case_angles));
            out.push_str("}}");
        }
    });
    out
}

impl MacroContext<'_> {
    fn name(&self, who: Who) -> &str {
        match who {
            Who::Char => self.char_name,
            Who::User => self.user_name,
        }
    }

    fn names(&self, text: &str) -> String {
        names(text, self.char_name, self.user_name, true)
    }

    fn field(&self, f: Field) -> &str {
        match f {
            Field::Description => self.description,
            Field::Personality => self.personality,
            Field::Scenario => self.scenario,
            Field::Persona => self.persona,
            Field::MesExamples => self.mes_examples,
            Field::LastMessage => self.last_message,
        }
    }
}

/// The output, with `{{trim}}`'s pending removal of leading whitespace.
struct Out {
    text: String,
    trim_next: bool,
}

impl Out {
    fn push(&mut self, piece: &str) {
        let piece = if self.trim_next {
            let rest = piece.trim_start();
            self.trim_next = rest.is_empty();
            rest
        } else {
            piece
        };
        self.text.push_str(piece);
    }

    fn trim(&mut self) {
        let keep = self.text.trim_end().len();
        self.text.truncate(keep);
        self.trim_next = true;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Char,
    User,
}

/// One piece of scanned text.
enum Piece<'t> {
    /// Plain text.
    Text(&'t str),
    /// `{{body}}`; `raw` is all of it, braces included.
    Curly { raw: &'t str, body: &'t str },
    /// `<BOT>`, `<CHAR>` or `<USER>` in any case.
    Angle { raw: &'t str, who: Who },
}

const ANGLES: [(&str, Who); 3] = [
    ("<bot>", Who::Char),
    ("<char>", Who::Char),
    ("<user>", Who::User),
];

/// Splits `text` into pieces, in order, in time linear in its length.
fn scan<'t>(text: &'t str, mut each: impl FnMut(Piece<'t>)) {
    scan_until(text, |piece| {
        each(piece);
        true
    });
}

/// [`scan`], stopping early once `each` returns false.
fn scan_until<'t>(text: &'t str, mut each: impl FnMut(Piece<'t>) -> bool) {
    let b = text.as_bytes();
    let (mut lit, mut i) = (0, 0);
    // Once no `}}` follows, no later `{{` can close either: skip the search.
    let mut closable = true;
    while i < b.len() {
        if closable && b[i] == b'{' && b.get(i + 1) == Some(&b'{') {
            if b.get(i + 2) == Some(&b'{') {
                i += 1;
                continue;
            }
            match next_pair(b, i + 2) {
                Some((k, b'}')) => {
                    if lit < i && !each(Piece::Text(&text[lit..i])) {
                        return;
                    }
                    let piece = Piece::Curly {
                        raw: &text[i..k + 2],
                        body: &text[i + 2..k],
                    };
                    if !each(piece) {
                        return;
                    }
                    i = k + 2;
                    lit = i;
                }
                Some(_) => i += 2,
                None => {
                    closable = false;
                    i += 2;
                }
            }
        } else if b[i] == b'<'
            && matches!(b.get(i + 1), Some(b'b' | b'B' | b'c' | b'C' | b'u' | b'U'))
        {
            let hit = ANGLES.iter().find(|(n, _)| {
                b.get(i..i + n.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(n.as_bytes()))
            });
            match hit {
                Some(&(n, who)) => {
                    if lit < i && !each(Piece::Text(&text[lit..i])) {
                        return;
                    }
                    let piece = Piece::Angle {
                        raw: &text[i..i + n.len()],
                        who,
                    };
                    if !each(piece) {
                        return;
                    }
                    i += n.len();
                    lit = i;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    if lit < b.len() {
        each(Piece::Text(&text[lit..]));
    }
}

/// The first `{{` or `}}` at or after `from`: its index and brace.
fn next_pair(b: &[u8], from: usize) -> Option<(usize, u8)> {
    let mut k = from;
    while k + 1 < b.len() {
        let c = b[k];
        if (c == b'{' || c == b'}') && b[k + 1] == c {
            return Some((k, c));
        }
        k += 1;
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Description,
    Personality,
    Scenario,
    Persona,
    MesExamples,
    LastMessage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Time,
    Date,
    Weekday,
    IsoTime,
    IsoDate,
}

impl Clock {
    fn pattern(self) -> &'static str {
        match self {
            Self::Time => "%-I:%M %p",
            Self::Date => "%B %-d, %Y",
            Self::Weekday => "%A",
            Self::IsoTime => "%H:%M",
            Self::IsoDate => "%Y-%m-%d",
        }
    }
}

/// A macro understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind<'t> {
    Char,
    User,
    Original,
    Field(Field),
    Clock(Clock),
    Random(List<'t>),
    Pick(List<'t>),
    Roll(Dice),
    Comment,
    Newline,
    Noop,
    Trim,
}

impl Kind<'_> {
    fn is_volatile(self) -> bool {
        matches!(
            self,
            Self::Random(_) | Self::Roll(_) | Self::Clock(_) | Self::Field(Field::LastMessage)
        )
    }
}

const SIMPLE: [(&str, Kind<'static>); 17] = [
    ("char", Kind::Char),
    ("user", Kind::User),
    ("original", Kind::Original),
    ("description", Kind::Field(Field::Description)),
    ("personality", Kind::Field(Field::Personality)),
    ("scenario", Kind::Field(Field::Scenario)),
    ("persona", Kind::Field(Field::Persona)),
    ("mesexamples", Kind::Field(Field::MesExamples)),
    ("lastmessage", Kind::Field(Field::LastMessage)),
    ("time", Kind::Clock(Clock::Time)),
    ("date", Kind::Clock(Clock::Date)),
    ("weekday", Kind::Clock(Clock::Weekday)),
    ("isotime", Kind::Clock(Clock::IsoTime)),
    ("isodate", Kind::Clock(Clock::IsoDate)),
    ("newline", Kind::Newline),
    ("noop", Kind::Noop),
    ("trim", Kind::Trim),
];

/// What a macro body means, if anything.
fn parse(body: &str) -> Option<Kind<'_>> {
    if body.starts_with("//") {
        return Some(Kind::Comment);
    }
    let b = body.as_bytes();
    const LONGEST: usize = 11;
    if b.len() <= LONGEST {
        // Lowercase a copy once instead of comparing case-insensitively per name.
        let mut buf = [0u8; LONGEST];
        for (d, s) in buf.iter_mut().zip(b) {
            *d = s.to_ascii_lowercase();
        }
        let lower = &buf[..b.len()];
        if let Some(&(_, k)) = SIMPLE.iter().find(|(n, _)| n.as_bytes() == lower) {
            return Some(k);
        }
    }
    match b.first().map(u8::to_ascii_lowercase) {
        Some(b'r') => {
            if let Some(rest) = strip_prefix_ci(body, "random") {
                return List::parse(rest).map(Kind::Random);
            }
            // SillyTavern accepts `{{roll:1d6}}` and `{{roll 1d6}}`.
            let rest = strip_prefix_ci(body, "roll")?;
            Dice::parse(rest.strip_prefix([':', ' '])?).map(Kind::Roll)
        }
        Some(b'p') => List::parse(strip_prefix_ci(body, "pick")?).map(Kind::Pick),
        _ => None,
    }
}

fn strip_prefix_ci<'t>(s: &'t str, prefix: &str) -> Option<&'t str> {
    let head = s.as_bytes().get(..prefix.len())?;
    // An ASCII prefix matched, so `prefix.len()` is a char boundary.
    head.eq_ignore_ascii_case(prefix.as_bytes())
        .then(|| &s[prefix.len()..])
}

/// The items of `{{random}}` / `{{pick}}`: `a::b` when the list has `::`,
/// else `a,b` (items trimmed, `\,` a literal comma), as SillyTavern splits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct List<'t>(&'t str);

impl<'t> List<'t> {
    /// `rest` is what follows the name: `:list` or `::list` (one space allowed before).
    fn parse(rest: &'t str) -> Option<Self> {
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        let rest = rest.strip_prefix(':')?;
        let rest = rest.strip_prefix(':').unwrap_or(rest);
        (!rest.is_empty()).then_some(Self(rest))
    }

    fn items(self) -> Vec<Cow<'t, str>> {
        if self.0.contains("::") {
            return self.0.split("::").map(Cow::Borrowed).collect();
        }
        if !self.0.contains("\\,") {
            return self.0.split(',').map(|s| Cow::Borrowed(s.trim())).collect();
        }
        let mut items = Vec::new();
        let mut item = String::new();
        let mut chars = self.0.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&',') => {
                    item.push(',');
                    chars.next();
                }
                ',' => items.push(Cow::Owned(std::mem::take(&mut item).trim().to_owned())),
                c => item.push(c),
            }
        }
        items.push(Cow::Owned(item.trim().to_owned()));
        items
    }

    fn choose(self, rng: &mut Rng) -> Cow<'t, str> {
        let mut items = self.items();
        let i = rng.below(items.len() as u64) as usize;
        items.swap_remove(i)
    }
}

/// `NdS+M`: at most [`Dice::MAX_COUNT`] dice of at most [`Dice::MAX_SIDES`] sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dice {
    count: u64,
    sides: u64,
    plus: i64,
}

impl Dice {
    const MAX_COUNT: u64 = 100;
    const MAX_SIDES: u64 = 1_000_000;

    /// `1d6`, `d20`, `20` (one die), `2d6+3`, `1d8-1`.
    fn parse(formula: &str) -> Option<Self> {
        let f = formula.trim();
        let (count, rest) = match f.find(['d', 'D']) {
            Some(i) => (&f[..i], &f[i + 1..]),
            None => ("", f),
        };
        let (sides, plus) = match rest.find(['+', '-']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let count = if count.is_empty() { 1 } else { number(count)? };
        let sides = number(sides)?;
        let plus = match plus.split_at_checked(1) {
            Some(("+", n)) => number(n)? as i64,
            Some(("-", n)) => -(number(n)? as i64),
            _ => 0,
        };
        let ok = (1..=Self::MAX_COUNT).contains(&count)
            && (1..=Self::MAX_SIDES).contains(&sides)
            && plus.unsigned_abs() <= Self::MAX_SIDES;
        ok.then_some(Self { count, sides, plus })
    }

    fn roll(self, rng: &mut Rng) -> i64 {
        let sum: u64 = (0..self.count).map(|_| 1 + rng.below(self.sides)).sum();
        sum as i64 + self.plus
    }
}

/// Plain ASCII digits, short enough that no bound check can overflow.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// splitmix64: tiny, fast and well mixed; enough for dice and choices.
struct Rng(u64);

impl Rng {
    /// A stream for one macro: the seed, the macro's text and its occurrence.
    fn for_macro(seed: u64, body: &str, ordinal: u64) -> Self {
        let mut r = Self(seed ^ fnv1a(body));
        let mixed = r.next();
        Self(mixed ^ ordinal.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// FNV-1a: a hash that never changes between builds, unlike std's.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::{Duration, Instant};

    fn ctx() -> MacroContext<'static> {
        MacroContext {
            original: None,
            now: FixedOffset::east_opt(3600)
                .unwrap()
                .with_ymd_and_hms(2026, 12, 2, 14, 5, 9)
                .unwrap(),
            reply_seed: 7,
            chat_seed: 11,
            description: "{{char}} pilots for {{user}}. {{random:x,y}}",
            personality: "dry <user>-loyal",
            scenario: "Deep space.",
            persona: "Captain.",
            mes_examples: "<START>\n{{user}}: Hi",
            last_message: "Status?",
            ..MacroContext::new("Kes", "Ava")
        }
    }

    #[test]
    fn every_fixed_macro_expands_as_documented() {
        let with_original = MacroContext {
            original: Some("Be {{char}}."),
            ..ctx()
        };
        let table: &[(&str, &str, &MacroContext)] = &[
            ("{{char}} and {{user}}", "Kes and Ava", &ctx()),
            ("{{CHAR}} {{User}} {{cHaR}}", "Kes Ava Kes", &ctx()),
            (
                "<BOT> <char> <USER> <Bot> <CHAR>",
                "Kes Kes Ava Kes Kes",
                &ctx(),
            ),
            ("{{original}}", "{{original}}", &ctx()),
            ("{{original}} More.", "Be Kes. More.", &with_original),
            (
                "{{description}}",
                "Kes pilots for Ava. {{random:x,y}}",
                &ctx(),
            ),
            ("{{personality}}", "dry Ava-loyal", &ctx()),
            ("{{scenario}}|{{persona}}", "Deep space.|Captain.", &ctx()),
            ("{{mesExamples}}", "<START>\nAva: Hi", &ctx()),
            ("{{MESEXAMPLES}}", "<START>\nAva: Hi", &ctx()),
            ("{{lastMessage}}", "Status?", &ctx()),
            ("{{time}}", "2:05 PM", &ctx()),
            ("{{date}}", "December 2, 2026", &ctx()),
            ("{{weekday}}", "Wednesday", &ctx()),
            ("{{isotime}}", "14:05", &ctx()),
            ("{{isodate}}", "2026-12-02", &ctx()),
            ("a{{// a note, {with} braces}}b", "ab", &ctx()),
            ("a{{//}}b", "ab", &ctx()),
            ("a{{newline}}b", "a\nb", &ctx()),
            ("a{{noop}}b", "ab", &ctx()),
            ("a  \n{{trim}}\n  b", "ab", &ctx()),
            ("a {{newline}} {{trim}} b", "ab", &ctx()),
            ("{{trim}}  lead", "lead", &ctx()),
            ("{{weather}} {{ char }}", "{{weather}} {{ char }}", &ctx()),
            ("{{ unclosed {{char}}", "{{ unclosed Kes", &ctx()),
            ("{{{char}}}", "{Kes}", &ctx()),
            ("{{{{char}}}}", "{{Kes}}", &ctx()),
            ("{{}} {x} <b> <START>", "{{}} {x} <b> <START>", &ctx()),
            (
                "{{random}} {{random:}} {{pick}}",
                "{{random}} {{random:}} {{pick}}",
                &ctx(),
            ),
            (
                "{{randomly:a}} {{rolling}}",
                "{{randomly:a}} {{rolling}}",
                &ctx(),
            ),
            ("ünï {{user}} 🌙", "ünï Ava 🌙", &ctx()),
        ];
        for (input, want, c) in table {
            assert_eq!(expand(input, c), *want, "input {input:?}");
        }
    }

    #[test]
    fn random_and_pick_choose_from_their_lists() {
        let table: &[(&str, &[&str])] = &[
            ("{{random:a,b,c}}", &["a", "b", "c"]),
            ("{{random: a , b }}", &["a", "b"]),
            ("{{random::x, y::z}}", &["x, y", "z"]),
            ("{{random :a,b}}", &["a", "b"]),
            ("{{random:one\\, two,three}}", &["one, two", "three"]),
            ("{{RANDOM:only}}", &["only"]),
            ("{{pick::a::b::c}}", &["a", "b", "c"]),
            ("{{pick:a,b}}", &["a", "b"]),
        ];
        for (input, allowed) in table {
            let mut seen = std::collections::HashSet::new();
            for seed in 0..50 {
                let c = MacroContext {
                    reply_seed: seed,
                    chat_seed: seed,
                    ..ctx()
                };
                let got = expand(input, &c);
                assert!(allowed.contains(&got.as_str()), "{input}: {got:?}");
                seen.insert(got);
            }
            assert_eq!(seen.len(), allowed.len(), "{input}: every item turns up");
        }
    }

    #[test]
    fn rolls_stay_within_their_dice() {
        let table: &[(&str, i64, i64)] = &[
            ("{{roll:1d6}}", 1, 6),
            ("{{roll:d20}}", 1, 20),
            ("{{roll:20}}", 1, 20),
            ("{{roll 20}}", 1, 20),
            ("{{roll:2d6+3}}", 5, 15),
            ("{{roll:1D8-1}}", 0, 7),
            ("{{roll:100d1000000}}", 100, 100_000_000),
            ("{{roll: 3d4 }}", 3, 12),
        ];
        for (input, lo, hi) in table {
            let mut seen = std::collections::HashSet::new();
            for seed in 0..200 {
                let c = MacroContext {
                    reply_seed: seed,
                    ..ctx()
                };
                let n: i64 = expand(input, &c).parse().unwrap();
                assert!((*lo..=*hi).contains(&n), "{input}: {n}");
                seen.insert(n);
            }
            assert!(seen.len() > 2, "{input} varies");
        }
        for bad in [
            "{{roll:101d6}}",
            "{{roll:1d1000001}}",
            "{{roll:0d6}}",
            "{{roll:d0}}",
            "{{roll:2d6+x}}",
            "{{roll:}}",
            "{{roll:-3}}",
            "{{roll:99999999999999999999}}",
            "{{roll:1d6+2000000}}",
        ] {
            assert_eq!(expand(bad, &ctx()), bad, "{bad} stays as written");
        }
    }

    #[test]
    fn the_same_seeds_give_the_same_text() {
        let text = "{{random:a,b,c,d}} {{roll:3d6}} {{pick::x::y::z}} {{random:a,b,c,d}}";
        assert_eq!(expand(text, &ctx()), expand(text, &ctx()));
        let again = MacroContext {
            description: "other",
            ..ctx()
        };
        assert_eq!(expand(text, &ctx()), expand(text, &again));
    }

    #[test]
    fn random_varies_with_the_reply_seed_and_pick_does_not() {
        let text = "{{random:a,b,c,d,e,f}}|{{pick::a::b::c::d::e::f}}";
        let mut randoms = std::collections::HashSet::new();
        let mut picks = std::collections::HashSet::new();
        for seed in 0..50 {
            let c = MacroContext {
                reply_seed: seed,
                ..ctx()
            };
            let out = expand(text, &c);
            let (r, p) = out.split_once('|').unwrap();
            randoms.insert(r.to_owned());
            picks.insert(p.to_owned());
        }
        assert!(randoms.len() > 3, "{randoms:?}");
        assert_eq!(picks.len(), 1, "pick is stable for the chat");
        let mut chats = std::collections::HashSet::new();
        for seed in 0..50 {
            let c = MacroContext {
                chat_seed: seed,
                ..ctx()
            };
            chats.insert(expand("{{pick::a::b::c::d::e::f}}", &c));
        }
        assert!(chats.len() > 3, "another chat may pick another item");
    }

    #[test]
    fn pick_is_tied_to_its_place_not_to_the_text_around_it() {
        let p = "{{pick::a::b::c::d::e::f::g::h}}";
        let alone = expand(p, &ctx());
        // Text before or after does not move the choice; the second copy draws apart.
        assert_eq!(
            expand(&format!("Hello {p} there"), &ctx()),
            format!("Hello {alone} there")
        );
        let differ = (0..50).any(|s| {
            let c = MacroContext {
                chat_seed: s,
                ..ctx()
            };
            let out = expand(&format!("{p}{p}"), &c);
            out[..1] != out[1..]
        });
        assert!(differ, "two places may differ");
    }

    #[test]
    fn volatile_and_unknown_macros_are_found() {
        let table: &[(&str, bool)] = &[
            ("{{random:a,b}}", true),
            ("{{roll:d6}}", true),
            ("{{time}}", true),
            ("{{DATE}}", true),
            ("{{weekday}}", true),
            ("{{isotime}}", true),
            ("{{isodate}}", true),
            ("{{lastMessage}}", true),
            (
                "{{pick::a::b}} {{char}} {{description}} {{// random:a}}",
                false,
            ),
            ("{{random}} {{roll:0}} {{time later", false),
            ("plain", false),
        ];
        for (text, want) in table {
            assert_eq!(has_volatile(text), *want, "{text}");
        }
        assert_eq!(
            volatile_macros("{{time}} {{random:a,b}} {{time}}"),
            ["{{time}}", "{{random:a,b}}"]
        );
        let text = "{{weather}} {{char}} {{roll:0d6}} {{weather}} {{original}} {{}} {{ x";
        assert_eq!(
            unknown_macros(text, false),
            ["{{weather}}", "{{roll:0d6}}", "{{original}}"]
        );
        assert_eq!(unknown_macros(text, true), ["{{weather}}", "{{roll:0d6}}"]);
    }

    #[test]
    fn replace_names_keeps_the_prompt_builders_behaviour() {
        let table = [
            (
                "{{char}} & {{USER}}; <BOT> <USER> {{Char}} {x} <b>",
                "K & A; K A K {x} <b>",
            ),
            ("ünï {{user}}", "ünï A"),
            (
                "<bot> <char> {{random:a}} {{time}}",
                "<bot> <char> {{random:a}} {{time}}",
            ),
            ("{{weather <BOT>}} {{{char}}", "{{weather K}} {K"),
            ("{{random::{{user}}::b}}", "{{random::A::b}}"),
        ];
        for (input, want) in table {
            assert_eq!(replace_names(input, "K", "A"), want, "{input}");
        }
    }

    #[test]
    fn hostile_input_finishes_fast() {
        let start = Instant::now();
        let braces = "{".repeat(1 << 20);
        assert_eq!(expand(&braces, &ctx()), braces);
        let opens = "{{ ".repeat(300_000);
        assert_eq!(expand(&opens, &ctx()), opens);
        let closes = format!("{}{}", "{{".repeat(200_000), "}}".repeat(200_000));
        assert_eq!(expand(&closes, &ctx()).len(), closes.len());
        let angles = "<<<<<<bot".repeat(100_000);
        assert_eq!(expand(&angles, &ctx()).len(), angles.len());
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn a_hundred_thousand_macros_finish_fast() {
        let start = Instant::now();
        // 100,000 macros.
        let many = "{{char}}{{random:a,b}}{{roll:2d6}}{{pick::x::y}}{{trim}} ".repeat(20_000);
        let out = expand(&many, &ctx());
        assert!(out.starts_with("Kes"));
        assert!(has_volatile(&many));
        assert_eq!(unknown_macros(&many, false).len(), 0);
        let trims = "{{trim}}".repeat(100_000);
        assert_eq!(expand(&trims, &ctx()), "");
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }
}
