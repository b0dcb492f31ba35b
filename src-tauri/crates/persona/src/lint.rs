//! The card linter: how much of the model's window a card takes before the
//! chat even starts, and the problems a card author can fix, in plain words.
//! The editor runs it as the user types; `dramatis-cli card lint` prints it.
//!
//! Fields are counted as the prompt carries them: macros expanded (with the
//! placeholder name [`USER_NAME`] for `{{user}}`), the personality and
//! scenario with their line starts, each `<START>` example block with its
//! "Example of how … speaks:" heading.

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;
use serde_json::Value;

use crate::CharacterCard;
use crate::macros::{self, MacroContext};

/// Stands for `{{user}}` while counting: the linter does not know who will chat.
pub const USER_NAME: &str = "User";

/// What the linter looks at.
#[derive(Debug, Clone, Copy)]
pub struct LintInput<'a> {
    /// The card.
    pub card: &'a CharacterCard,
    /// The content of the lorebook entries that always fire (constant ones).
    pub constant_entries: &'a [&'a str],
    /// The model's context window, in tokens (e.g. 2048).
    pub window: usize,
    /// Tokens kept free for the reply (e.g. 300).
    pub reply_tokens: usize,
    /// The user persona's description (may be empty).
    pub user_persona: &'a str,
    /// The app's system prompt (empty when the built-in default is used).
    pub global_system_prompt: &'a str,
}

impl<'a> LintInput<'a> {
    /// The card alone, with a 2048-token window and 300 tokens for the reply.
    pub fn new(card: &'a CharacterCard) -> Self {
        Self {
            card,
            constant_entries: &[],
            window: 2048,
            reply_tokens: 300,
            user_persona: "",
            global_system_prompt: "",
        }
    }
}

/// One card field's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldTokens {
    /// The field as the card format spells it (`description`, `mes_example`, ...).
    pub field: String,
    /// Its tokens as the prompt carries it (all greetings summed; for
    /// `character_book`, the entries that always fire).
    pub tokens: usize,
    /// Whether it is sent with every reply (greetings are history; creator
    /// notes are never sent).
    pub in_prompt: bool,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Makes chats worse.
    Warning,
    /// Leaves (almost) no room for the chat.
    Error,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lint {
    /// The card field it is about.
    pub field: String,
    /// How bad it is.
    pub severity: Severity,
    /// The problem, with numbers.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

/// The linter's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LintReport {
    /// Every card field's size, in a fixed order.
    pub fields: Vec<FieldTokens>,
    /// Tokens sent with every reply: system prompt, description, personality,
    /// scenario, user persona, examples, post-history instructions and the
    /// always-on lorebook entries.
    pub permanent_tokens: usize,
    /// The window it was measured against.
    pub window: usize,
    /// What is left for the chat: window − permanent − reply reserve (at least 0).
    pub history_tokens: usize,
    /// About how many turns of chat fit in `history_tokens`, taking the first
    /// message (60 tokens when there is none; at least 40) as a typical turn.
    pub history_turns_estimate: usize,
    /// `permanent_tokens / window`.
    pub share: f32,
    /// The findings, worst first (in rule order within a severity).
    pub lints: Vec<Lint>,
}

/// Measures `input.card` and lists its problems; `count` gives a text's tokens.
pub fn lint(input: &LintInput, count: impl Fn(&str) -> usize) -> LintReport {
    let card = input.card;
    let char_name = char_name(card);
    let base = MacroContext {
        description: &card.description,
        personality: &card.personality,
        scenario: &card.scenario,
        persona: input.user_persona,
        mes_examples: &card.mes_example,
        ..MacroContext::new(char_name, USER_NAME)
    };
    let fill = |text: &str, original: Option<&str>| {
        macros::expand(text.trim(), &MacroContext { original, ..base })
    };
    let sized = |text: &str, original: Option<&str>| {
        if text.trim().is_empty() {
            0
        } else {
            count(&fill(text, original))
        }
    };
    let with_start = |start: &str, text: &str| {
        if text.trim().is_empty() {
            0
        } else {
            count(&fill(&format!("{start}{}", text.trim()), None))
        }
    };

    let global = input.global_system_prompt;
    let system = sized(&card.system_prompt, Some(global));
    let system_used = if system > 0 {
        system
    } else if !global.trim().is_empty() {
        sized(global, None)
    } else {
        sized(crate::prompt::DEFAULT_SYSTEM_PROMPT, None)
    };
    let description = sized(&card.description, None);
    let personality = with_start("{{char}}'s personality: ", &card.personality);
    let scenario = with_start("Scenario: ", &card.scenario);
    let persona = with_start("About {{user}}: ", input.user_persona);
    let examples: usize = example_blocks(&card.mes_example)
        .map(|e| {
            count(&fill(
                &format!("Example of how {{{{char}}}} speaks:\n{e}"),
                None,
            ))
        })
        .sum();
    let post = sized(&card.post_history_instructions, Some(global));
    let constant: usize = input.constant_entries.iter().map(|e| sized(e, None)).sum();
    let first_mes = sized(&card.first_mes, None);
    let greetings: usize = card
        .alternate_greetings
        .iter()
        .map(|g| sized(g, None))
        .sum();
    let notes = if card.creator_notes.trim().is_empty() {
        0
    } else {
        count(card.creator_notes.trim())
    };

    let field = |name: &str, tokens, in_prompt| FieldTokens {
        field: name.to_owned(),
        tokens,
        in_prompt,
    };
    let fields = vec![
        field("description", description, true),
        field("personality", personality, true),
        field("scenario", scenario, true),
        field("first_mes", first_mes, false),
        field("mes_example", examples, true),
        field("system_prompt", system, true),
        field("post_history_instructions", post, true),
        field("creator_notes", notes, false),
        field("alternate_greetings", greetings, false),
        field("character_book", constant, true),
    ];

    let window = input.window;
    let permanent =
        system_used + description + personality + scenario + persona + examples + post + constant;
    let history_tokens = window
        .saturating_sub(permanent)
        .saturating_sub(input.reply_tokens);
    let turn = if card.first_mes.trim().is_empty() {
        60
    } else {
        first_mes.max(40)
    };
    let turns = history_tokens / turn;
    let share = permanent as f32 / window.max(1) as f32;

    let mut lints = Vec::new();
    let mut add = |field: &str, severity, message: String, fix: String| {
        lints.push(Lint {
            field: field.to_owned(),
            severity,
            message,
            fix,
        });
    };
    let pct = |n: usize| (n as f64 * 100.0 / window.max(1) as f64).round() as usize;

    // The room left for the chat.
    let biggest = fields
        .iter()
        .filter(|f| f.in_prompt)
        .max_by_key(|f| f.tokens)
        .filter(|f| f.tokens > 0);
    let over = share > 0.5;
    if over || turns < 2 {
        let severity = if share > 0.85 || turns < 2 {
            Severity::Error
        } else {
            Severity::Warning
        };
        let field_name = biggest.map_or("description", |f| f.field.as_str());
        if over {
            let shorten = match biggest {
                Some(f) => format!(
                    "Shorten the {} (the largest part, {} tokens)",
                    label(&f.field),
                    thousands(f.tokens)
                ),
                None => "Shorten the description".to_owned(),
            };
            add(
                field_name,
                severity,
                format!(
                    "The character's permanent text uses {} of {} tokens ({}%): {}.",
                    thousands(permanent),
                    thousands(window),
                    pct(permanent),
                    turns_phrase(turns)
                ),
                format!(
                    "{shorten} or move background facts into lorebook entries with keys, \
                     so they are only sent when mentioned."
                ),
            );
        } else {
            add(
                field_name,
                severity,
                format!(
                    "Only {} of {} tokens (word pieces) are left for the chat after the \
                     character's permanent text ({}) and the room kept for the reply ({}): {}.",
                    thousands(history_tokens),
                    thousands(window),
                    thousands(permanent),
                    thousands(input.reply_tokens),
                    turns_phrase(turns)
                ),
                "Choose a model with a larger context window or shorter replies in the \
                 settings, or shorten the character's text."
                    .to_owned(),
            );
        }
    }

    if examples * 4 > window {
        add(
            "mes_example",
            Severity::Warning,
            format!(
                "The example dialogues use {}% of the window ({} of {} tokens), on every reply.",
                pct(examples),
                thousands(examples),
                thousands(window)
            ),
            "Keep one or two short examples that show how the character speaks; \
             after a few turns the chat itself shows the style."
                .to_owned(),
        );
    }
    if constant * 4 > window {
        add(
            "character_book",
            Severity::Warning,
            format!(
                "Lorebook entries that are always sent use {}% of the window ({} of {} tokens).",
                pct(constant),
                thousands(constant),
                thousands(window)
            ),
            "Give background entries keys so they are sent only when mentioned, \
             and keep the always-on ones short."
                .to_owned(),
        );
    }

    if card.description.trim().is_empty() {
        add(
            "description",
            Severity::Warning,
            "The description is empty: the model knows nothing about the character but the name."
                .to_owned(),
            "Describe who the character is: appearance, manner, background, how they speak."
                .to_owned(),
        );
    }
    if card.first_mes.trim().is_empty() {
        add(
            "first_mes",
            Severity::Info,
            "There is no first message: the chat starts with the user's message.".to_owned(),
            "Write a greeting that sets the scene, so the model hears the character's voice \
             from the start."
                .to_owned(),
        );
    }

    // Text before the chat: a change there makes the model read the whole prompt again.
    let entries = input.constant_entries;
    let prefix_fields: [(&str, &[&str]); 6] = [
        ("system_prompt", &[card.system_prompt.as_str()]),
        ("description", &[card.description.as_str()]),
        ("personality", &[card.personality.as_str()]),
        ("scenario", &[card.scenario.as_str()]),
        ("mes_example", &[card.mes_example.as_str()]),
        ("character_book", entries),
    ];
    for (name, texts) in prefix_fields {
        let found = distinct(texts.iter().flat_map(|t| macros::volatile_macros(t)));
        if found.is_empty() {
            continue;
        }
        add(
            name,
            Severity::Warning,
            format!(
                "{} in the {} {} on every reply, so the start of the prompt changes and the \
                 model reads the whole prompt again each turn (slower replies).",
                listing(&found),
                label(name),
                if found.len() == 1 {
                    "changes"
                } else {
                    "change"
                }
            ),
            "Use {{pick::a::b}} for a choice that stays the same for the whole chat; put \
             times or the last message in the post-history instructions, which come after \
             the chat."
                .to_owned(),
        );
    }

    let lines = dialogue_labels(&card.mes_example);
    if !card.mes_example.contains("<START>") && lines.len() >= 4 {
        add(
            "mes_example",
            Severity::Info,
            format!(
                "The examples have no <START> line, so their {} dialogue lines are sent as one \
                 long example.",
                thousands(lines.len())
            ),
            "Put <START> on its own line before each example conversation.".to_owned(),
        );
    }
    let mut seen = HashSet::new();
    let strangers: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !is_known_speaker(l, card, char_name))
        .filter(|l| seen.insert(l.to_lowercase()))
        .collect();
    if !strangers.is_empty() {
        let quoted: Vec<String> = strangers
            .iter()
            .take(3)
            .map(|s| format!("\"{s}:\""))
            .collect();
        add(
            "mes_example",
            Severity::Info,
            format!(
                "Example lines start with {} instead of {{{{char}}}}: or {{{{user}}}}:, so the \
                 model cannot tell who is speaking and may copy those names into replies.",
                join_and(&quoted)
            ),
            "Start each example line with {{char}}: or {{user}}:; they become the names used \
             in the chat."
                .to_owned(),
        );
    }

    let lower = card.personality.to_lowercase();
    let doubled = ["{{char}}", card.name.trim(), char_name]
        .into_iter()
        .filter(|n| !n.is_empty())
        .find(|n| {
            let n = n.to_lowercase();
            lower.contains(&format!("{n}'s personality:"))
                || lower.contains(&format!("{n}\u{2019}s personality:"))
        });
    if let Some(n) = doubled {
        add(
            "personality",
            Severity::Info,
            format!(
                "The personality already says \"{n}'s personality:\", and the prompt adds that \
                 line start too, so the model sees it twice."
            ),
            format!("Remove \"{n}'s personality:\" and write only the traits."),
        );
    }

    if !card.system_prompt.trim().is_empty()
        && !global.trim().is_empty()
        && !card.system_prompt.to_lowercase().contains("{{original}}")
    {
        add(
            "system_prompt",
            Severity::Info,
            format!(
                "This system prompt replaces the app's own system prompt ({} tokens) for this \
                 character.",
                thousands(sized(global, None))
            ),
            "Add {{original}} where the app's system prompt should go, or leave it out if \
             replacing it is what you want."
                .to_owned(),
        );
    }

    let greetings: Vec<&str> = card
        .alternate_greetings
        .iter()
        .map(String::as_str)
        .collect();
    let macro_fields: [(&str, &[&str], bool); 9] = [
        ("description", &[card.description.as_str()], false),
        ("personality", &[card.personality.as_str()], false),
        ("scenario", &[card.scenario.as_str()], false),
        ("first_mes", &[card.first_mes.as_str()], false),
        ("mes_example", &[card.mes_example.as_str()], false),
        ("system_prompt", &[card.system_prompt.as_str()], true),
        (
            "post_history_instructions",
            &[card.post_history_instructions.as_str()],
            true,
        ),
        ("alternate_greetings", &greetings, false),
        ("character_book", entries, false),
    ];
    for (name, texts, original) in macro_fields {
        let unknown = distinct(
            texts
                .iter()
                .flat_map(|t| macros::unknown_macros(t, original)),
        );
        if unknown.is_empty() {
            continue;
        }
        let one = unknown.len() == 1;
        let original_here = unknown
            .iter()
            .any(|u| u.eq_ignore_ascii_case("{{original}}"));
        add(
            name,
            Severity::Info,
            format!(
                "The {} {} {}, which {} not {} Dramatis knows: {} as written.",
                label(name),
                if label(name).ends_with('s') {
                    "have"
                } else {
                    "has"
                },
                listing(&unknown),
                if one { "is" } else { "are" },
                if one { "a macro" } else { "macros" },
                if one { "it stays" } else { "they stay" },
            ),
            format!(
                "Check the spelling, or remove {}; known macros include {{{{char}}}}, \
                 {{{{user}}}}, {{{{random:a,b}}}}, {{{{pick::a::b}}}} and {{{{roll:1d6}}}}{}.",
                if one { "it" } else { "them" },
                if original_here {
                    " ({{original}} works only in the system prompt and post-history \
                     instructions)"
                } else {
                    ""
                }
            ),
        );
    }

    lints.sort_by_key(|l| std::cmp::Reverse(l.severity));
    LintReport {
        fields,
        permanent_tokens: permanent,
        window,
        history_tokens,
        history_turns_estimate: turns,
        share,
        lints,
    }
}

/// The name `{{char}}` stands for: V3's `nickname` when set, else the name.
fn char_name(card: &CharacterCard) -> &str {
    card.other
        .get("nickname")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or(card.name.trim())
}

/// The example blocks as the prompt builder splits them.
fn example_blocks(mes_example: &str) -> impl Iterator<Item = &str> {
    mes_example
        .split("<START>")
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

/// The speaker of each dialogue line (`Name: words`) in the examples.
fn dialogue_labels(text: &str) -> Vec<&str> {
    // A short label that starts with a letter, a `{{macro}}` or an `<ANGLE>`
    // form, then a colon and words on the same line; narration like `*She
    // smiles*` or a time like 12:30 is no label.
    static LABEL: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?m)^[ \t]*(\{\{[A-Za-z]+\}\}|<[A-Za-z]+>|\p{L}[\p{L}\p{N} _'.\-]{0,39}?)[ \t]*:[ \t]*\S")
            .expect("a valid pattern")
    });
    LABEL
        .captures_iter(text)
        .filter_map(|c| c.get(1))
        .map(|m| m.as_str())
        .filter(|l| l.split_whitespace().count() <= 4)
        .collect()
}

fn is_known_speaker(label: &str, card: &CharacterCard, char_name: &str) -> bool {
    const MACROS: [&str; 5] = ["{{char}}", "{{user}}", "<bot>", "<char>", "<user>"];
    MACROS.iter().any(|m| label.eq_ignore_ascii_case(m))
        || [card.name.trim(), char_name]
            .iter()
            .any(|n| !n.is_empty() && label.to_lowercase() == n.to_lowercase())
}

/// `items` without repeats, in order.
fn distinct<'t>(items: impl Iterator<Item = &'t str>) -> Vec<&'t str> {
    let mut seen = HashSet::new();
    items.filter(|i| seen.insert(*i)).collect()
}

/// What the user calls a field.
fn label(field: &str) -> &str {
    match field {
        "mes_example" => "example dialogues",
        "system_prompt" => "system prompt",
        "post_history_instructions" => "post-history instructions",
        "character_book" => "always-on lorebook entries",
        "first_mes" => "first message",
        "alternate_greetings" => "alternate greetings",
        "creator_notes" => "creator's notes",
        other => other,
    }
}

fn turns_phrase(turns: usize) -> String {
    match turns {
        0 => "replies will see none of the chat".to_owned(),
        1 => "replies will see only about 1 turn of the chat".to_owned(),
        n => format!(
            "replies will see only about {} turns of the chat",
            thousands(n)
        ),
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [head @ .., last] => format!("{} and {last}", head.join(", ")),
    }
}

/// Up to three macros, then how many more.
fn listing(found: &[&str]) -> String {
    let mut named: Vec<String> = found.iter().take(3).map(|s| (*s).to_owned()).collect();
    if found.len() > 3 {
        named.push(format!("{} more", found.len() - 3));
    }
    join_and(&named)
}

/// `1254` → `1,254`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn clean() -> CharacterCard {
        CharacterCard {
            name: "Kestrel".into(),
            description: "{{char}} is the ship's AI; {{user}} is her captain.".into(),
            personality: "dry, loyal".into(),
            scenario: "Deep space.".into(),
            first_mes: "*The lights flicker on.* Good morning, {{user}}.".into(),
            mes_example:
                "<START>\n{{user}}: Status?\n{{char}}: Nominal.\n<START>\n{{user}}: Joke?\nKestrel: No."
                    .into(),
            creator_notes: "A terse ship AI. {{weather}} here is never sent.".into(),
            ..Default::default()
        }
    }

    fn run(card: &CharacterCard) -> LintReport {
        lint(&LintInput::new(card), words)
    }

    fn rules(r: &LintReport) -> Vec<(&str, Severity)> {
        r.lints
            .iter()
            .map(|l| (l.field.as_str(), l.severity))
            .collect()
    }

    #[test]
    fn a_clean_card_has_no_findings() {
        let c = clean();
        let r = run(&c);
        assert_eq!(r.lints, vec![], "{:#?}", r.lints);
        let global = "Be {{char}}, always.";
        let with_global = LintInput {
            global_system_prompt: global,
            user_persona: "A tired captain.",
            ..LintInput::new(&c)
        };
        assert_eq!(lint(&with_global, words).lints, vec![]);
    }

    #[test]
    fn fields_are_counted_as_the_prompt_carries_them() {
        let mut c = clean();
        c.other.insert("nickname".into(), "Kes Trel".into());
        c.system_prompt = "You are {{char}}. {{original}}".into();
        c.post_history_instructions = "Stay terse. {{// a note}}".into();
        c.alternate_greetings = vec!["Hi.".into(), "Hello there {{user}}.".into()];
        let entries = ["The ship is called Wren.", "  "];
        let input = LintInput {
            constant_entries: &entries,
            user_persona: "A tired captain.",
            global_system_prompt: "Write well.",
            window: 1000,
            reply_tokens: 100,
            ..LintInput::new(&c)
        };
        let r = lint(&input, words);
        let got: Vec<(&str, usize, bool)> = r
            .fields
            .iter()
            .map(|f| (f.field.as_str(), f.tokens, f.in_prompt))
            .collect();
        assert_eq!(
            got,
            [
                // "Kes Trel is the ship's AI; User is her captain." (the nickname is two words)
                ("description", 10, true),
                // "Kes Trel's personality: dry, loyal"
                ("personality", 5, true),
                ("scenario", 3, true),
                ("first_mes", 7, false),
                // "Example of how Kes Trel speaks:" (6), then 5 and 4 words of dialogue
                ("mes_example", 21, true),
                // "You are Kes Trel. Write well."
                ("system_prompt", 6, true),
                ("post_history_instructions", 2, true),
                ("creator_notes", 9, false),
                ("alternate_greetings", 4, false),
                ("character_book", 5, true),
            ]
        );
        // + "About User: A tired captain." (5)
        assert_eq!(r.permanent_tokens, 10 + 5 + 3 + 21 + 6 + 2 + 5 + 5);
        assert_eq!(r.history_tokens, 1000 - 57 - 100);
        assert_eq!(
            r.history_turns_estimate,
            843 / 40,
            "a short greeting counts as 40"
        );
        assert!((r.share - 0.057).abs() < 1e-6);
    }

    #[test]
    fn without_a_card_system_prompt_the_app_one_counts() {
        let c = clean();
        let none = run(&c);
        let default = words(&crate::prompt::DEFAULT_SYSTEM_PROMPT.replace("{{char}}", "Kestrel"));
        assert_eq!(none.fields[5].tokens, 0);
        let global = LintInput {
            global_system_prompt: "Short.",
            ..LintInput::new(&c)
        };
        let with = lint(&global, words);
        assert_eq!(none.permanent_tokens - with.permanent_tokens, default - 1);
    }

    #[test]
    fn share_and_turns_follow_the_window() {
        // Table: (description words, first message words, window, reply) →
        // (permanent, history, turns, severity of the budget finding).
        type Row = (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            Option<Severity>,
        );
        let table: &[Row] = &[
            (100, 0, 2048, 300, 101, 1647, 27, None),
            (100, 80, 2048, 300, 101, 1647, 20, None),
            (1100, 100, 2048, 300, 1101, 647, 6, Some(Severity::Warning)),
            (1800, 100, 2048, 300, 1801, 0, 0, Some(Severity::Error)),
            (1200, 300, 2048, 300, 1201, 547, 1, Some(Severity::Error)),
            (10, 100, 400, 300, 11, 89, 0, Some(Severity::Error)),
            (3000, 100, 2048, 300, 3001, 0, 0, Some(Severity::Error)),
        ];
        for &(desc, first, window, reply, perm, hist, turns, sev) in table {
            let c = CharacterCard {
                name: "K".into(),
                description: "w ".repeat(desc),
                first_mes: "w ".repeat(first),
                ..clean()
            };
            let c = CharacterCard {
                personality: String::new(),
                scenario: String::new(),
                mes_example: String::new(),
                system_prompt: "Sys".into(),
                ..c
            };
            let input = LintInput {
                window,
                reply_tokens: reply,
                ..LintInput::new(&c)
            };
            let r = lint(&input, words);
            assert_eq!(
                (
                    r.permanent_tokens,
                    r.history_tokens,
                    r.history_turns_estimate
                ),
                (perm, hist, turns),
                "{desc} words"
            );
            assert!((r.share - perm as f32 / window as f32).abs() < 1e-6);
            let budget = r
                .lints
                .iter()
                .find(|l| l.message.contains("tokens") && l.field == "description");
            assert_eq!(
                budget.map(|l| l.severity),
                sev,
                "{desc} words: {:?}",
                r.lints
            );
        }
    }

    #[test]
    fn the_budget_message_has_the_numbers() {
        let c = CharacterCard {
            name: "K".into(),
            description: "w ".repeat(1253),
            first_mes: "w ".repeat(150),
            system_prompt: "Sys".into(),
            ..Default::default()
        };
        let r = run(&c);
        let l = &r.lints[0];
        assert_eq!(l.severity, Severity::Warning);
        assert_eq!(l.field, "description");
        assert_eq!(
            l.message,
            "The character's permanent text uses 1,254 of 2,048 tokens (61%): replies will see \
             only about 3 turns of the chat."
        );
        assert_eq!(
            l.fix,
            "Shorten the description (the largest part, 1,253 tokens) or move background facts \
             into lorebook entries with keys, so they are only sent when mentioned."
        );
        // A big reply reserve, not the card, leaves no room: that is said too.
        let small = clean();
        let tight = LintInput {
            window: 400,
            reply_tokens: 390,
            ..LintInput::new(&small)
        };
        let l = &lint(&tight, words).lints[0];
        assert_eq!(l.severity, Severity::Error);
        assert!(
            l.message
                .starts_with("Only 0 of 400 tokens (word pieces) are left"),
            "{}",
            l.message
        );
    }

    #[test]
    fn each_rule_fires_when_it_should() {
        // (case, edit of the clean card, the findings, text in the first message)
        type Row = (
            &'static str,
            fn(&mut CharacterCard),
            &'static [(&'static str, Severity)],
            &'static str,
        );
        let table: &[Row] = &[
            (
                "empty first message",
                |c| c.first_mes = " ".into(),
                &[("first_mes", Severity::Info)],
                "starts with the user's message",
            ),
            (
                "empty description",
                |c| c.description.clear(),
                &[("description", Severity::Warning)],
                "description is empty",
            ),
            (
                "big examples",
                |c| c.mes_example = format!("<START>\n{{{{char}}}}: {}", "w ".repeat(600)),
                &[("mes_example", Severity::Warning)],
                "example dialogues use 30% of the window (606 of 2,048 tokens)",
            ),
            (
                "random in the description",
                |c| c.description.push_str(" Mood: {{random:glad,sad}}."),
                &[("description", Severity::Warning)],
                "{{random:glad,sad}} in the description changes on every reply",
            ),
            (
                "time and roll in the scenario",
                |c| c.scenario = "It is {{time}}; luck {{roll:d6}}.".into(),
                &[("scenario", Severity::Warning)],
                "{{time}} and {{roll:d6}} in the scenario change on every reply",
            ),
            (
                "random in the system prompt",
                |c| c.system_prompt = "Be {{char}} {{random:a,b}}.".into(),
                &[("system_prompt", Severity::Warning)],
                "slower replies",
            ),
            (
                "no START with many lines",
                |c| {
                    c.mes_example = "{{user}}: A\n{{char}}: B\n{{user}}: C\n{{char}}: D".into();
                },
                &[("mes_example", Severity::Info)],
                "no <START> line, so their 4 dialogue lines",
            ),
            (
                "strange speakers",
                |c| c.mes_example = "<START>\nYou: Hi\nMe: Hello\nyou: Again".into(),
                &[("mes_example", Severity::Info)],
                "\"You:\" and \"Me:\" instead of {{char}}: or {{user}}:",
            ),
            (
                "personality with its own line start",
                |c| c.personality = "Kestrel's personality: dry".into(),
                &[("personality", Severity::Info)],
                "already says \"Kestrel's personality:\"",
            ),
            (
                "personality with the macro line start",
                |c| c.personality = "{{Char}}'s Personality: dry".into(),
                &[("personality", Severity::Info)],
                "the model sees it twice",
            ),
            (
                "unknown macro",
                |c| c.scenario = "It rains. {{weather}} {{Weather}} {{weather}}".into(),
                &[("scenario", Severity::Info)],
                "{{weather}} and {{Weather}}, which are not macros Dramatis knows: they stay",
            ),
            (
                "original outside the system prompt",
                |c| c.description.push_str(" {{original}}"),
                &[("description", Severity::Info)],
                "{{original}}, which is not a macro Dramatis knows",
            ),
            (
                "unknown macros in two greetings",
                |c| c.alternate_greetings = vec!["{{mood}}".into(), "{{mood}} {{hat}}".into()],
                &[("alternate_greetings", Severity::Info)],
                "The alternate greetings have {{mood}} and {{hat}}, which are",
            ),
        ];
        for (name, edit, want, text) in table {
            let mut c = clean();
            edit(&mut c);
            let r = run(&c);
            assert_eq!(rules(&r), *want, "{name}: {:#?}", r.lints);
            let l = &r.lints[0];
            assert!(l.message.contains(text), "{name}: {}", l.message);
            assert!(
                l.fix.ends_with('.') && l.fix.len() > 20,
                "{name}: {}",
                l.fix
            );
        }
    }

    #[test]
    fn rules_that_need_the_inputs() {
        let mut c = clean();
        c.system_prompt = "Be {{char}}.".into();
        let input = LintInput {
            global_system_prompt: "Write vivid prose.",
            ..LintInput::new(&c)
        };
        let r = lint(&input, words);
        assert_eq!(rules(&r), [("system_prompt", Severity::Info)]);
        assert!(
            r.lints[0]
                .message
                .contains("replaces the app's own system prompt (3 tokens)")
        );
        // With {{original}}, or without an app prompt, nothing to say.
        let global = "Write vivid prose.";
        c.system_prompt = "Be {{char}}. {{ORIGINAL}}".into();
        let input = LintInput {
            global_system_prompt: global,
            ..LintInput::new(&c)
        };
        assert_eq!(lint(&input, words).lints, vec![]);
        c.system_prompt = "Be {{char}}.".into();
        assert_eq!(run(&c).lints, vec![]);
        // Post-history instructions come after the chat: volatile macros there are fine.
        let mut c = clean();
        c.post_history_instructions = "It is {{time}}. {{original}}".into();
        assert_eq!(run(&c).lints, vec![]);

        let c = clean();
        let long = "fact ".repeat(600);
        let entries = [long.as_str(), "{{random:a,b}} {{hat}}"];
        let input = LintInput {
            constant_entries: &entries,
            ..LintInput::new(&c)
        };
        let r = lint(&input, words);
        assert_eq!(
            rules(&r),
            [
                ("character_book", Severity::Warning),
                ("character_book", Severity::Warning),
                ("character_book", Severity::Info),
            ],
            "{:#?}",
            r.lints
        );
        assert!(
            r.lints[0]
                .message
                .contains("always sent use 29% of the window (602 of 2,048")
        );
    }

    #[test]
    fn rules_stay_quiet_otherwise() {
        let mut c = clean();
        // Two short lines without <START>, the names themselves as speakers, pick and
        // known macros: all fine.
        c.mes_example = "Kestrel: Hi\n{{user}}: Hello".into();
        c.description = "{{char}} {{pick::calm::wry}}; {{// author note}} 12:30 *She: hums*".into();
        c.personality = "Kestrel's moods: personality of steel".into();
        c.first_mes = "It is {{time}} on {{weekday}}.".into();
        assert_eq!(run(&c).lints, vec![]);
        let mut c = clean();
        c.other.insert("nickname".into(), "Kes".into());
        c.mes_example = "<START>\nKes: Hi\nKESTREL: Yo\n<USER>: Hey".into();
        assert_eq!(run(&c).lints, vec![]);
    }

    #[test]
    fn numbers_get_separators() {
        let table = [
            (0, "0"),
            (7, "7"),
            (999, "999"),
            (1000, "1,000"),
            (1254, "1,254"),
            (65_536, "65,536"),
            (1_000_000, "1,000,000"),
        ];
        for (n, want) in table {
            assert_eq!(thousands(n), want);
        }
    }

    #[test]
    fn findings_are_sorted_worst_first() {
        let c = CharacterCard {
            name: "K".into(),
            description: "w ".repeat(1900),
            scenario: "{{weather}}".into(),
            ..Default::default()
        };
        let r = run(&c);
        let sev: Vec<Severity> = r.lints.iter().map(|l| l.severity).collect();
        let mut sorted = sev.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(sev, sorted);
        assert_eq!(sev[0], Severity::Error);
        assert!(sev.contains(&Severity::Info));
    }
}
