//! The role-play prompt format, in one place: the markers of the
//! hieunguyenminh/roleplay data (`<|system|>…</s>\n<|user|>…</s>\n<|assistant|>…</s>`),
//! so adapters trained on it fit the chat prompt. Phi-2's tokenizer has none
//! of these as special tokens: they are plain text, in training and in chat.

/// Opens the system part.
pub const SYSTEM: &str = "<|system|>";
/// Opens a user turn.
pub const USER: &str = "<|user|>";
/// Opens an assistant turn.
pub const ASSISTANT: &str = "<|assistant|>";
/// Closes any part.
pub const END: &str = "</s>";

/// Who speaks in a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The system part.
    System,
    /// The user.
    User,
    /// The character.
    Assistant,
}

impl Speaker {
    fn marker(self) -> &'static str {
        match self {
            Self::System => SYSTEM,
            Self::User => USER,
            Self::Assistant => ASSISTANT,
        }
    }
}

/// One finished part: `<|role|>text</s>\n`.
pub fn turn(speaker: Speaker, text: &str) -> String {
    format!("{}{}{END}\n", speaker.marker(), text.trim())
}

/// The opening of the reply the model is asked to write.
pub fn reply_opening() -> &'static str {
    ASSISTANT
}

/// Strings that end a reply: the end marker, or the model starting another turn.
pub fn stop_strings() -> Vec<String> {
    [END, USER, SYSTEM, "<|endoftext|>"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// How a chat is laid out for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    /// `<|system|>…</s>\n<|user|>…</s>\n<|assistant|>…`: what the role-play
    /// data (and adapters trained on it) use.
    #[default]
    Roleplay,
    /// A plain transcript: `Name: text` lines after the system part.
    Transcript,
}

/// Replaces `{{char}}` and `{{user}}` (any case; also the old `<BOT>` and `<USER>`).
pub fn replace_macros(text: &str, char_name: &str, user_name: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(['{', '<']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let lower: String = tail
            .chars()
            .take(8)
            .collect::<String>()
            .to_ascii_lowercase();
        let (rep, len) = if lower.starts_with("{{char}}") {
            (char_name, 8)
        } else if lower.starts_with("{{user}}") {
            (user_name, 8)
        } else if tail.starts_with("<BOT>") {
            (char_name, 5)
        } else if tail.starts_with("<USER>") {
            (user_name, 6)
        } else {
            let c = tail.chars().next().expect("found above");
            out.push(c);
            rest = &tail[c.len_utf8()..];
            continue;
        };
        out.push_str(rep);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Everything a prompt is made from.
#[derive(Debug, Clone)]
pub struct PromptParts<'a> {
    /// The character.
    pub card: &'a crate::CharacterCard,
    /// The user persona's name (`{{user}}`).
    pub user_name: &'a str,
    /// The user persona's description (may be empty).
    pub user_description: &'a str,
    /// The system prompt used when the card has none.
    pub global_system_prompt: &'a str,
    /// The visible conversation, oldest first (greeting included).
    pub history: &'a [(Speaker, String)],
    /// Text the reply must continue (for "continue"); `None` for a new reply.
    pub continue_from: Option<&'a str>,
    /// The layout.
    pub format: PromptFormat,
}

/// An assembled prompt and what the budget let in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Prompt {
    /// The text to feed the model.
    pub text: String,
    /// Its token count.
    pub tokens: usize,
    /// The budget it was built for.
    pub budget: usize,
    /// Turns of history included (the newest ones).
    pub turns_included: usize,
    /// Turns of history there are.
    pub turns_total: usize,
    /// Extra stop strings for this format.
    #[serde(skip)]
    pub stop: Vec<String>,
}

/// The default system prompt when neither the card nor the settings give one.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are {{char}}. Stay in character and write {{char}}'s next reply in a role-play with {{user}}. Be vivid, keep replies to a few paragraphs, and never speak for {{user}}.";

impl PromptParts<'_> {
    /// The system part: system prompt, description, personality, scenario,
    /// the user persona, and example dialogues (each `<START>` block).
    fn system_text(&self) -> String {
        let c = self.card;
        let sys = if c.system_prompt.trim().is_empty() {
            if self.global_system_prompt.trim().is_empty() {
                DEFAULT_SYSTEM_PROMPT
            } else {
                self.global_system_prompt
            }
        } else {
            // SillyTavern's convention: {{original}} stands for the global prompt.
            &c.system_prompt
                .replace("{{original}}", self.global_system_prompt)
        };
        let mut parts = vec![sys.trim().to_owned()];
        if !c.description.trim().is_empty() {
            parts.push(c.description.trim().to_owned());
        }
        if !c.personality.trim().is_empty() {
            parts.push(format!(
                "{{{{char}}}}'s personality: {}",
                c.personality.trim()
            ));
        }
        if !c.scenario.trim().is_empty() {
            parts.push(format!("Scenario: {}", c.scenario.trim()));
        }
        if !self.user_description.trim().is_empty() {
            parts.push(format!(
                "About {{{{user}}}}: {}",
                self.user_description.trim()
            ));
        }
        for example in c
            .mes_example
            .split("<START>")
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            parts.push(format!("Example of how {{{{char}}}} speaks:\n{example}"));
        }
        self.fill(&parts.join("\n\n"))
    }

    fn fill(&self, text: &str) -> String {
        replace_macros(text, &self.card.name, self.user_name)
    }

    fn name(&self, s: Speaker) -> &str {
        match s {
            Speaker::User => self.user_name,
            Speaker::Assistant => &self.card.name,
            Speaker::System => "Narrator",
        }
    }

    fn render_turn(&self, s: Speaker, text: &str) -> String {
        let text = self.fill(text);
        match self.format {
            PromptFormat::Roleplay => turn(s, &text),
            PromptFormat::Transcript => format!("{}: {}\n", self.name(s), text.trim()),
        }
    }

    fn render_system(&self, text: &str) -> String {
        match self.format {
            PromptFormat::Roleplay => turn(Speaker::System, text),
            PromptFormat::Transcript => format!("{}\n\n", text.trim()),
        }
    }

    fn opening(&self) -> String {
        let start = match self.format {
            PromptFormat::Roleplay => reply_opening().to_owned(),
            PromptFormat::Transcript => format!("{}:", self.card.name),
        };
        match self.continue_from {
            // The reply so far, without its end: the model writes on.
            Some(t) => format!(
                "{start}{}{}",
                if self.format == PromptFormat::Transcript {
                    " "
                } else {
                    ""
                },
                self.fill(t)
            ),
            None => start,
        }
    }

    /// The whole conversation as training text: the system part, then every
    /// turn, each closed with its end marker (no budget, no reply opening).
    pub fn render_full(&self) -> String {
        let mut text = self.render_system(&self.system_text());
        for (s, t) in self.history {
            text.push_str(&self.render_turn(*s, t));
        }
        text
    }

    /// Assembles the prompt within `budget` tokens (`count` gives a text's
    /// token count): the system part and post-history instructions always,
    /// then as many of the newest turns as fit, oldest dropped first.
    pub fn build(&self, budget: usize, count: impl Fn(&str) -> usize) -> Prompt {
        let head = self.render_system(&self.system_text());
        let post = self.card.post_history_instructions.trim();
        let tail = if post.is_empty() {
            String::new()
        } else {
            self.render_system(&self.fill(post))
        };
        let opening = self.opening();
        let turns: Vec<String> = self
            .history
            .iter()
            .map(|(s, t)| self.render_turn(*s, t))
            .collect();
        let fixed = count(&head) + count(&tail) + count(&opening);
        // Newest first, while the sum fits; then check the whole text, since
        // token counts of pieces need not add up exactly.
        let mut used = fixed;
        let mut first = turns.len();
        while first > 0 {
            let n = count(&turns[first - 1]);
            if used + n > budget {
                break;
            }
            used += n;
            first -= 1;
        }
        loop {
            let text = format!("{head}{}{tail}{opening}", turns[first..].concat());
            let tokens = count(&text);
            if tokens <= budget || first == turns.len() {
                return Prompt {
                    text,
                    tokens,
                    budget,
                    turns_included: turns.len() - first,
                    turns_total: turns.len(),
                    stop: match self.format {
                        PromptFormat::Roleplay => stop_strings(),
                        PromptFormat::Transcript => {
                            let mut s = stop_strings();
                            s.push(format!("\n{}:", self.user_name));
                            s
                        }
                    },
                };
            }
            first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_use_the_dataset_markers() {
        let p = format!(
            "{}{}{}",
            turn(Speaker::System, "Be Kestrel."),
            turn(Speaker::User, " hi "),
            reply_opening()
        );
        assert_eq!(
            p,
            "<|system|>Be Kestrel.</s>\n<|user|>hi</s>\n<|assistant|>"
        );
        assert!(stop_strings().contains(&"</s>".to_owned()));
    }
}

#[cfg(test)]
mod build_tests {
    use super::*;
    use crate::CharacterCard;

    fn card() -> CharacterCard {
        CharacterCard {
            name: "Kestrel".into(),
            description: "{{char}} is the ship's AI; {{user}} is her captain.".into(),
            personality: "dry, loyal".into(),
            scenario: "Deep space.".into(),
            mes_example: "<START>\n{{user}}: Status?\n{{char}}: Nominal.\n<START>\n{{user}}: Joke?\n{{char}}: No.".into(),
            post_history_instructions: "Stay terse, {{char}}.".into(),
            ..Default::default()
        }
    }

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn history(n: usize) -> Vec<(Speaker, String)> {
        (0..n)
            .map(|i| {
                let s = if i % 2 == 0 {
                    Speaker::Assistant
                } else {
                    Speaker::User
                };
                (s, format!("turn number {i} says {{{{user}}}} hello"))
            })
            .collect()
    }

    fn parts<'a>(c: &'a CharacterCard, h: &'a [(Speaker, String)]) -> PromptParts<'a> {
        PromptParts {
            card: c,
            user_name: "Ava",
            user_description: "",
            global_system_prompt: "",
            history: h,
            continue_from: None,
            format: PromptFormat::Roleplay,
        }
    }

    #[test]
    fn macros_are_replaced_in_any_case_and_old_style() {
        assert_eq!(
            replace_macros(
                "{{char}} & {{USER}}; <BOT> <USER> {{Char}} {x} <b>",
                "K",
                "A"
            ),
            "K & A; K A K {x} <b>"
        );
        assert_eq!(replace_macros("ünï {{user}}", "K", "Åva"), "ünï Åva");
    }

    #[test]
    fn the_system_part_has_every_card_field_in_order() {
        let c = card();
        let h = history(2);
        let p = parts(&c, &h).build(10_000, words);
        let t = &p.text;
        assert!(t.starts_with("<|system|>You are Kestrel."), "{t}");
        let order = [
            "Kestrel is the ship's AI; Ava is her captain.",
            "Kestrel's personality: dry, loyal",
            "Scenario: Deep space.",
            "Ava: Status?\nKestrel: Nominal.",
            "Ava: Joke?",
            "<|assistant|>turn number 0",
            "<|user|>turn number 1 says Ava hello",
            "<|system|>Stay terse, Kestrel.</s>\n<|assistant|>",
        ];
        let mut at = 0;
        for o in order {
            let pos = t[at..]
                .find(o)
                .unwrap_or_else(|| panic!("`{o}` not in order in {t}"));
            at += pos + o.len();
        }
        assert!(t.ends_with("<|assistant|>"));
        assert!(!t.contains("{{"));
        assert_eq!((p.turns_included, p.turns_total), (2, 2));
    }

    #[test]
    fn the_budget_drops_the_oldest_turns_and_never_the_system_part() {
        let c = card();
        let h = history(40);
        let all = parts(&c, &h).build(100_000, words);
        let budget = all.tokens / 2;
        let p = parts(&c, &h).build(budget, words);
        assert!(p.tokens <= budget);
        assert!(p.turns_included < 40 && p.turns_included > 0);
        assert!(p.text.contains("Scenario: Deep space."));
        assert!(p.text.contains("Stay terse"));
        // The newest turn is in, the oldest out, and what is in is a suffix.
        assert!(p.text.contains("turn number 39 "));
        assert!(!p.text.contains("turn number 0 "));
        let first_in = 40 - p.turns_included;
        assert!(p.text.contains(&format!("turn number {first_in} ")));
        assert!(!p.text.contains(&format!("turn number {} ", first_in - 1)));
        // A tiny budget keeps the system part even with no turn at all.
        let p = parts(&c, &h).build(5, words);
        assert_eq!(p.turns_included, 0);
        assert!(p.text.contains("Scenario"));
    }

    #[test]
    fn the_card_system_prompt_wins_and_transcript_format_uses_names() {
        let mut c = card();
        c.system_prompt = "Custom for {{char}}. {{original}}".into();
        let h = history(2);
        let mut pp = parts(&c, &h);
        pp.global_system_prompt = "Global.";
        pp.format = PromptFormat::Transcript;
        pp.continue_from = Some("I was saying");
        let p = pp.build(10_000, words);
        assert!(
            p.text.starts_with("Custom for Kestrel. Global."),
            "{}",
            p.text
        );
        assert!(p.text.contains("Kestrel: turn number 0"));
        assert!(p.text.contains("Ava: turn number 1"));
        assert!(p.text.ends_with("Kestrel: I was saying"));
        assert!(p.stop.contains(&"\nAva:".to_owned()));
    }
}
