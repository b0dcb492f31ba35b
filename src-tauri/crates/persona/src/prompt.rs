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

impl From<crate::lorebook::Role> for Speaker {
    /// Who speaks a lorebook entry placed in the chat.
    fn from(r: crate::lorebook::Role) -> Self {
        use crate::lorebook::Role;
        match r {
            Role::System => Self::System,
            Role::User => Self::User,
            Role::Assistant => Self::Assistant,
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

/// The prompt that asks the model to fold `turns` (oldest first) into the
/// story's summary `previous` (empty when there is none yet): a system part
/// with the task, the transcript as the user's turn, and the reply opening.
pub fn summary_prompt(
    char_name: &str,
    user_name: &str,
    previous: &str,
    turns: &[(Speaker, String)],
) -> String {
    let transcript: String = turns
        .iter()
        .map(|(s, t)| {
            let who = match s {
                Speaker::User => user_name,
                Speaker::Assistant => char_name,
                Speaker::System => "Narrator",
            };
            format!(
                "{who}: {}\n",
                replace_macros(t.trim(), char_name, user_name)
            )
        })
        .collect();
    let previous = previous.trim();
    let mut ask = String::new();
    if !previous.is_empty() {
        ask.push_str(&format!("The story so far: {previous}\n\n"));
    }
    ask.push_str(&format!(
        "What happened next:\n{transcript}\nWrite the story so far in a few sentences."
    ));
    format!(
        "{}{}{ASSISTANT}",
        turn(
            Speaker::System,
            &format!(
                "You keep the memory of a role-play between {char_name} and {user_name}: \
                 a short summary, in the past tense, of the events, places, names and promises \
                 that matter later. No commentary."
            )
        ),
        turn(Speaker::User, &ask)
    )
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

/// SillyTavern's author's note: text placed as a system part `depth` turns
/// from the end of the history, on every `interval`th user turn.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AuthorNote {
    /// The note (macros allowed); empty is off.
    pub text: String,
    /// Turns from the end it goes before (0: right before the reply).
    pub depth: usize,
    /// Inserted when the user's turns so far are a multiple of this (1: always; 0: never).
    pub interval: usize,
}

impl AuthorNote {
    /// Whether the note goes into a prompt whose history has `user_turns` user turns.
    pub fn applies(&self, user_turns: usize) -> bool {
        !self.text.trim().is_empty()
            && self.interval > 0
            && user_turns.is_multiple_of(self.interval)
    }
}

/// How history leaves the window once it no longer fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    /// Turns are dropped so the first kept turn starts at a multiple of this
    /// many tokens of history (counted from the chat's first turn), so the
    /// cut stays put for several turns and the kept history is a stable
    /// block a cache can reuse. 0 drops only what must go, turn by turn.
    pub step: usize,
}

/// The first turn to keep of turns of `sizes` tokens (oldest first) when
/// `fixed` tokens are taken by the rest of a prompt of `budget`: the newest
/// turns that fit, the cut then moved on to the next [`Window::step`]
/// boundary of the history's running token count (unless that leaves no turn).
pub fn window_start(sizes: &[usize], fixed: usize, budget: usize, window: Window) -> usize {
    let mut used = fixed;
    let mut first = sizes.len();
    while first > 0 && used + sizes[first - 1] <= budget {
        used += sizes[first - 1];
        first -= 1;
    }
    if first == 0 || first == sizes.len() || window.step == 0 {
        return first;
    }
    let starts: Vec<usize> = sizes
        .iter()
        .scan(0, |acc, n| {
            let s = *acc;
            *acc += n;
            Some(s)
        })
        .collect();
    let target = starts[first].div_ceil(window.step) * window.step;
    match (first..sizes.len()).find(|&i| starts[i] >= target) {
        Some(i) if i + 1 < sizes.len() => i,
        _ => first,
    }
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
    /// What the story held before the window (a summary); empty for none.
    pub memory: &'a str,
    /// The most tokens the memory may take; a longer one keeps its end.
    pub memory_budget: usize,
    /// Where the memory goes: `None` after the character's definition (a
    /// stable place a cache reuses), `Some(n)` in the chat `n` turns from the end.
    pub memory_depth: Option<usize>,
    /// The author's note (off when its text is empty).
    pub author_note: Option<&'a AuthorNote>,
    /// How history is dropped.
    pub window: Window,
    /// The world-info entries that fired for this reply, each placed by its position.
    pub world: &'a [crate::worldinfo::Activated],
    /// The clock and seeds the macros use.
    pub env: MacroEnv,
}

/// What the time- and chance-dependent macros read: the local time, the
/// reply's seed (`{{random}}`, `{{roll}}`) and the chat's (`{{pick}}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MacroEnv {
    /// Local time now.
    pub now: chrono::DateTime<chrono::FixedOffset>,
    /// Changes with every new reply (a regenerate rolls again).
    pub reply_seed: u64,
    /// Fixed for the whole chat.
    pub chat_seed: u64,
}

impl Default for MacroEnv {
    /// The Unix epoch in UTC and zero seeds: reproducible, for tests and training text.
    fn default() -> Self {
        Self {
            now: chrono::DateTime::UNIX_EPOCH.fixed_offset(),
            reply_seed: 0,
            chat_seed: 0,
        }
    }
}

impl<'a> PromptParts<'a> {
    /// The parts of a plain role-play prompt: no memory, no note, turn-by-turn dropping.
    pub fn new(
        card: &'a crate::CharacterCard,
        user_name: &'a str,
        user_description: &'a str,
        history: &'a [(Speaker, String)],
    ) -> Self {
        Self {
            card,
            user_name,
            user_description,
            global_system_prompt: "",
            history,
            continue_from: None,
            format: PromptFormat::Roleplay,
            memory: "",
            memory_budget: 0,
            memory_depth: None,
            author_note: None,
            window: Window::default(),
            world: &[],
            env: MacroEnv::default(),
        }
    }
}

/// What a part of the prompt is, for the inspector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionKind {
    /// The system prompt (the card's or the global one).
    SystemPrompt,
    /// Description, personality and scenario.
    Definition,
    /// The user persona.
    Persona,
    /// Example dialogues.
    Examples,
    /// The memory of what left the window.
    Memory,
    /// The turns of the chat that fit.
    History,
    /// The author's note.
    AuthorNote,
    /// Lorebook entries that fired.
    WorldInfo,
    /// The card's post-history instructions.
    PostHistory,
    /// The opening of the reply (and the text being continued).
    Reply,
}

/// One part of an assembled prompt: `text[start..end]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Section {
    /// What it is.
    pub kind: SectionKind,
    /// Byte range in [`Prompt::text`].
    pub start: usize,
    /// End of the byte range.
    pub end: usize,
    /// Its token count (counted alone; the parts sum to the whole within a
    /// token or two where a join tokenizes differently).
    pub tokens: usize,
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
    /// The parts in order.
    pub sections: Vec<Section>,
    /// Whether the author's note is in.
    pub author_note_included: bool,
    /// Extra stop strings for this format.
    #[serde(skip)]
    pub stop: Vec<String>,
}

impl Prompt {
    /// Index in the history of the first turn in the window (`turns_total` when none is).
    pub fn first_turn(&self) -> usize {
        self.turns_total - self.turns_included
    }
}

/// The default system prompt when neither the card nor the settings give one.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are {{char}}. Stay in character and write {{char}}'s next reply in a role-play with {{user}}. Be vivid, keep replies to a few paragraphs, and never speak for {{user}}.";

/// Text with its sections' byte ranges, built piece by piece.
#[derive(Default)]
struct Layout {
    text: String,
    spans: Vec<(SectionKind, usize, usize)>,
}

impl Layout {
    fn push(&mut self, kind: SectionKind, piece: &str) {
        if piece.is_empty() {
            return;
        }
        let start = self.text.len();
        self.text.push_str(piece);
        match self.spans.last_mut() {
            // Consecutive pieces of one kind are one section.
            Some((k, _, end)) if *k == kind && *end == start => *end = self.text.len(),
            _ => self.spans.push((kind, start, self.text.len())),
        }
    }
}

impl PromptParts<'_> {
    /// The system part's pieces: system prompt, description, personality,
    /// scenario, the user persona, and example dialogues (each `<START>` block).
    fn system_pieces(&self) -> Vec<(SectionKind, String)> {
        use crate::lorebook::Position as P;
        let c = self.card;
        let (sys, original) = if c.system_prompt.trim().is_empty() {
            if self.global_system_prompt.trim().is_empty() {
                (DEFAULT_SYSTEM_PROMPT, None)
            } else {
                (self.global_system_prompt, None)
            }
        } else {
            // SillyTavern's convention: {{original}} stands for the global prompt.
            (c.system_prompt.as_str(), Some(self.global_system_prompt))
        };
        let world = |at: P| -> Vec<(SectionKind, String)> {
            self.world
                .iter()
                .filter(|e| e.position == at)
                .map(|e| (SectionKind::WorldInfo, self.fill(&e.content)))
                .collect()
        };
        let mut parts = vec![(
            SectionKind::SystemPrompt,
            self.fill_with(sys.trim(), original),
        )];
        parts.extend(world(P::BeforeChar));
        if !c.description.trim().is_empty() {
            parts.push((SectionKind::Definition, self.fill(c.description.trim())));
        }
        if !c.personality.trim().is_empty() {
            parts.push((
                SectionKind::Definition,
                self.fill(&format!(
                    "{{{{char}}}}'s personality: {}",
                    c.personality.trim()
                )),
            ));
        }
        if !c.scenario.trim().is_empty() {
            parts.push((
                SectionKind::Definition,
                self.fill(&format!("Scenario: {}", c.scenario.trim())),
            ));
        }
        parts.extend(world(P::AfterChar));
        if !self.user_description.trim().is_empty() {
            parts.push((
                SectionKind::Persona,
                self.fill(&format!(
                    "About {{{{user}}}}: {}",
                    self.user_description.trim()
                )),
            ));
        }
        parts.extend(world(P::ExamplesTop));
        for example in c
            .mes_example
            .split("<START>")
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            parts.push((
                SectionKind::Examples,
                self.fill(&format!("Example of how {{{{char}}}} speaks:\n{example}")),
            ));
        }
        parts.extend(world(P::ExamplesBottom));
        parts
            .into_iter()
            .filter(|(_, t)| !t.trim().is_empty())
            .collect()
    }

    /// The name `{{char}}` stands for: V3's `nickname` when the card has one.
    pub fn char_name(&self) -> &str {
        self.card
            .other
            .get("nickname")
            .and_then(serde_json::Value::as_str)
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.card.name)
    }

    fn fill(&self, text: &str) -> String {
        self.fill_with(text, None)
    }

    /// Expands the macros in `text`; `original` is the app's text that
    /// `{{original}}` stands for (only in the card's system prompt and
    /// post-history instructions).
    fn fill_with(&self, text: &str, original: Option<&str>) -> String {
        let c = self.card;
        let last = self.history.last().map_or("", |(_, t)| t.as_str());
        crate::macros::expand(
            text,
            &crate::macros::MacroContext {
                char_name: self.char_name(),
                user_name: self.user_name,
                original,
                now: self.env.now,
                reply_seed: self.env.reply_seed,
                chat_seed: self.env.chat_seed,
                description: &c.description,
                personality: &c.personality,
                scenario: &c.scenario,
                persona: self.user_description,
                mes_examples: &c.mes_example,
                last_message: last,
            },
        )
    }

    fn name(&self, s: Speaker) -> &str {
        match s {
            Speaker::User => self.user_name,
            Speaker::Assistant => self.char_name(),
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

    /// A system part made of `pieces`, laid out into `out`.
    fn render_system_into(&self, out: &mut Layout, pieces: &[(SectionKind, String)]) {
        let last = pieces.len().saturating_sub(1);
        for (i, (kind, t)) in pieces.iter().enumerate() {
            let mut piece = String::new();
            if i == 0 && self.format == PromptFormat::Roleplay {
                piece.push_str(SYSTEM);
            }
            piece.push_str(t.trim());
            if i < last {
                piece.push_str("\n\n");
            } else {
                piece.push_str(match self.format {
                    PromptFormat::Roleplay => "</s>\n",
                    PromptFormat::Transcript => "\n\n",
                });
            }
            out.push(*kind, &piece);
        }
    }

    fn render_system(&self, text: &str) -> String {
        let mut l = Layout::default();
        self.render_system_into(&mut l, &[(SectionKind::SystemPrompt, text.to_owned())]);
        l.text
    }

    fn opening(&self) -> String {
        let start = match self.format {
            PromptFormat::Roleplay => reply_opening().to_owned(),
            PromptFormat::Transcript => format!("{}:", self.char_name()),
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
        let mut l = Layout::default();
        self.render_system_into(&mut l, &self.system_pieces());
        let mut text = l.text;
        for (s, t) in self.history {
            text.push_str(&self.render_turn(*s, t));
        }
        text
    }

    /// The memory as a system part, its start cut until it fits its budget.
    fn memory_part(&self, count: &impl Fn(&str) -> usize) -> String {
        let memory = self.memory.trim();
        if memory.is_empty() || self.memory_budget == 0 {
            return String::new();
        }
        let render = |m: &str| self.render_system(&format!("Story so far: {m}"));
        let mut text = render(memory);
        let mut rest = memory;
        while count(&text) > self.memory_budget && !rest.is_empty() {
            // Drop an eighth of what is left from the front, at a word boundary
            // when there is one (a single long word is cut inside).
            let mut cut = rest.len() / 8;
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            let cut = rest[cut..]
                .find(char::is_whitespace)
                .map_or(cut.max(1), |w| cut + w);
            let cut = (cut..=rest.len())
                .find(|&i| rest.is_char_boundary(i))
                .unwrap_or(rest.len());
            rest = rest[cut..].trim_start();
            text = if rest.is_empty() {
                String::new()
            } else {
                render(&format!("… {rest}"))
            };
        }
        text
    }

    /// Assembles the prompt within `budget` tokens (`count` gives a text's
    /// token count): the system part, memory and post-history instructions
    /// always, then as many of the newest turns as fit, oldest dropped first
    /// (in [`Window::step`] steps), with the author's note at its depth.
    pub fn build(&self, budget: usize, count: impl Fn(&str) -> usize) -> Prompt {
        let mut head = Layout::default();
        self.render_system_into(&mut head, &self.system_pieces());
        let memory = self.memory_part(&count);
        // Parts placed in the chat at a depth, in this order where depths meet.
        let mut inserts: Vec<(usize, SectionKind, String)> = Vec::new();
        match self.memory_depth {
            None => head.push(SectionKind::Memory, &memory),
            Some(d) if !memory.is_empty() => inserts.push((d, SectionKind::Memory, memory)),
            Some(_) => {}
        }
        let post = self.card.post_history_instructions.trim();
        let tail = if post.is_empty() {
            String::new()
        } else {
            self.render_system(&self.fill_with(post, Some(self.global_system_prompt)))
        };
        let opening = self.opening();
        let turns: Vec<String> = self
            .history
            .iter()
            .map(|(s, t)| self.render_turn(*s, t))
            .collect();
        let user_turns = self
            .history
            .iter()
            .filter(|(s, _)| *s == Speaker::User)
            .count();
        let note = self.author_note.filter(|n| n.applies(user_turns));
        {
            use crate::lorebook::Position as P;
            let world_at = |at: P| -> Vec<String> {
                self.world
                    .iter()
                    .filter(|e| e.position == at)
                    .map(|e| self.render_system(&self.fill(&e.content)))
                    .collect()
            };
            // Entries placed around the author's note go where the note goes
            // (its depth), whether or not the note itself is due this turn.
            let note_depth = self.author_note.map_or(0, |n| n.depth);
            for text in world_at(P::AuthorNoteTop) {
                inserts.push((note_depth, SectionKind::WorldInfo, text));
            }
            if let Some(n) = note {
                let text = self.render_system(&self.fill(&n.text));
                inserts.push((n.depth, SectionKind::AuthorNote, text));
            }
            for text in world_at(P::AuthorNoteBottom) {
                inserts.push((note_depth, SectionKind::WorldInfo, text));
            }
            for e in self.world.iter().filter(|e| e.position == P::AtDepth) {
                let content = self.fill(&e.content);
                let text = match self.format {
                    PromptFormat::Roleplay => turn(e.role.into(), &content),
                    PromptFormat::Transcript => self.render_system(&content),
                };
                inserts.push((e.depth, SectionKind::WorldInfo, text));
            }
        }
        let inserted: usize = inserts.iter().map(|(_, _, t)| count(t)).sum();
        let fixed = count(&head.text) + count(&tail) + count(&opening) + inserted;
        let sizes: Vec<usize> = turns.iter().map(|t| count(t)).collect();
        let mut first = window_start(&sizes, fixed, budget, self.window);
        let stop = match self.format {
            PromptFormat::Roleplay => stop_strings(),
            PromptFormat::Transcript => {
                let mut s = stop_strings();
                s.push(format!("\n{}:", self.user_name));
                s
            }
        };
        // Token counts of pieces need not add up exactly: check the whole.
        loop {
            let mut l = Layout {
                text: head.text.clone(),
                spans: head.spans.clone(),
            };
            let kept = &turns[first..];
            for (i, t) in kept.iter().enumerate() {
                for (depth, kind, text) in &inserts {
                    if kept.len().saturating_sub(*depth) == i {
                        l.push(*kind, text);
                    }
                }
                l.push(SectionKind::History, t);
            }
            for (depth, kind, text) in &inserts {
                // Depth 0, or no turn to stand before.
                if kept.len().saturating_sub(*depth) == kept.len() {
                    l.push(*kind, text);
                }
            }
            l.push(SectionKind::PostHistory, &tail);
            l.push(SectionKind::Reply, &opening);
            let tokens = count(&l.text);
            if tokens <= budget || first == turns.len() {
                let sections = l
                    .spans
                    .iter()
                    .map(|&(kind, start, end)| Section {
                        kind,
                        start,
                        end,
                        tokens: count(&l.text[start..end]),
                    })
                    .collect();
                return Prompt {
                    text: l.text,
                    tokens,
                    budget,
                    turns_included: turns.len() - first,
                    turns_total: turns.len(),
                    sections,
                    author_note_included: note.is_some(),
                    stop,
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
        PromptParts::new(c, "Ava", "", h)
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

#[cfg(test)]
mod window_tests {
    use super::*;
    use crate::CharacterCard;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn card() -> CharacterCard {
        CharacterCard {
            name: "Kestrel".into(),
            description: "{{char}} is the ship's AI.".into(),
            scenario: "Deep space.".into(),
            mes_example: "<START>\n{{user}}: Status?\n{{char}}: Nominal.".into(),
            post_history_instructions: "Stay terse.".into(),
            ..Default::default()
        }
    }

    fn history(n: usize) -> Vec<(Speaker, String)> {
        (0..n)
            .map(|i| {
                let s = if i % 2 == 0 {
                    Speaker::Assistant
                } else {
                    Speaker::User
                };
                // Turns of uneven length, as in a real chat.
                let filler = "word ".repeat(3 + (i * 7) % 11);
                (s, format!("turn {i} {filler}"))
            })
            .collect()
    }

    #[test]
    fn stepped_cuts_stay_put_for_several_turns_and_always_fit() {
        let c = card();
        let budget = 200;
        let step = budget / 4;
        let mut last_first = 0;
        let mut last_text = String::new();
        let mut moves = 0;
        let mut turns_seen = 0;
        for n in 1..300 {
            let h = history(n);
            let mut p = PromptParts::new(&c, "Ava", "", &h);
            p.window = Window { step };
            let pr = p.build(budget, words);
            assert!(pr.tokens <= budget, "{n} turns: {} > {budget}", pr.tokens);
            assert!(pr.turns_included >= 1);
            let first = pr.first_turn();
            assert!(first >= last_first, "the cut never moves back");
            let hist = |t: &str| {
                let s = pr.sections.iter().find(|s| s.kind == SectionKind::History);
                s.map(|s| t[s.start..].to_owned()).unwrap_or_default()
            };
            if first == last_first && n > 1 {
                // The kept history grew only at its end: a cache reuses all of it.
                let before = &last_text;
                let now = hist(&pr.text);
                let common = before
                    .chars()
                    .zip(now.chars())
                    .take_while(|(a, b)| a == b)
                    .count();
                assert!(
                    common >= before.find("<|system|>Stay").unwrap_or(before.len()),
                    "{n}"
                );
            } else if first != last_first {
                moves += 1;
                if last_first > 0 {
                    // Every move after the first drops a whole step's worth of turns.
                    let dropped: usize = (last_first..first)
                        .map(|i| words(&p.render_turn(h[i].0, &h[i].1)))
                        .sum();
                    assert!(dropped >= step / 2, "a move dropped only {dropped} tokens");
                }
            }
            if first > 0 {
                turns_seen += 1;
            }
            last_first = first;
            last_text = hist(&pr.text);
        }
        // Turn by turn, the cut would move on nearly every turn once full.
        assert!(turns_seen > 250);
        assert!(
            moves * 3 < turns_seen,
            "{moves} moves in {turns_seen} full turns"
        );
        // A budget too small for any turn keeps the system part alone.
        let h = history(20);
        let mut p = PromptParts::new(&c, "Ava", "", &h);
        p.window = Window { step: 10 };
        assert_eq!(p.build(5, words).turns_included, 0);
    }

    #[test]
    fn without_a_step_the_fewest_turns_are_dropped() {
        let c = card();
        let h = history(100);
        let p = PromptParts::new(&c, "Ava", "", &h);
        let pr = p.build(200, words);
        let mut p2 = p.clone();
        p2.window = Window { step: 50 };
        let pr2 = p2.build(200, words);
        assert!(pr.turns_included >= pr2.turns_included);
        // One more turn would not fit.
        let first = pr.first_turn();
        let more: usize = words(&p.render_turn(h[first - 1].0, &h[first - 1].1));
        assert!(pr.tokens + more > 200);
    }

    #[test]
    fn the_author_note_goes_at_its_depth_on_its_interval() {
        let c = card();
        let h = history(10); // 5 user turns
        let note = AuthorNote {
            text: "Remember the storm, {{user}}.".into(),
            depth: 2,
            interval: 1,
        };
        let mut p = PromptParts::new(&c, "Ava", "", &h);
        p.author_note = Some(&note);
        let pr = p.build(10_000, words);
        assert!(pr.author_note_included);
        let at = pr
            .text
            .find("<|system|>Remember the storm, Ava.</s>\n")
            .unwrap();
        let t8 = pr.text.find("turn 8 ").unwrap();
        let t7 = pr.text.find("turn 7 ").unwrap();
        assert!(
            t7 < at && at < t8,
            "depth 2 sits before the second-last turn"
        );
        let kinds: Vec<SectionKind> = pr.sections.iter().map(|s| s.kind).collect();
        assert!(kinds.contains(&SectionKind::AuthorNote));
        // Every second user turn: 5 is odd, so not now; at depth 0, last before the reply.
        let odd = AuthorNote {
            interval: 2,
            ..note.clone()
        };
        p.author_note = Some(&odd);
        assert!(!p.build(10_000, words).author_note_included);
        let h4 = history(8);
        let deep = AuthorNote {
            depth: 0,
            interval: 2,
            ..note.clone()
        };
        let mut p = PromptParts::new(&c, "Ava", "", &h4);
        p.author_note = Some(&deep);
        let pr = p.build(10_000, words);
        assert!(
            pr.text.ends_with(
                "Remember the storm, Ava.</s>\n<|system|>Stay terse.</s>\n<|assistant|>"
            ),
            "{}",
            pr.text
        );
        // A depth beyond the history puts it first; an empty note is off.
        let far = AuthorNote {
            depth: 99,
            ..note.clone()
        };
        p.author_note = Some(&far);
        let pr = p.build(10_000, words);
        assert!(pr.text.find("Remember").unwrap() < pr.text.find("turn 0 ").unwrap());
        let empty = AuthorNote {
            text: " ".into(),
            ..note
        };
        p.author_note = Some(&empty);
        assert!(!p.build(10_000, words).author_note_included);
    }

    #[test]
    fn memory_sits_after_the_system_part_within_its_budget() {
        let c = card();
        let h = history(6);
        let long: String = (0..100).map(|i| format!("event{i} ")).collect();
        let mut p = PromptParts::new(&c, "Ava", "", &h);
        p.memory = &long;
        p.memory_budget = 30;
        let pr = p.build(10_000, words);
        let m = pr
            .sections
            .iter()
            .find(|s| s.kind == SectionKind::Memory)
            .unwrap();
        assert!(m.tokens <= 30, "{}", m.tokens);
        let text = &pr.text[m.start..m.end];
        // The newest events are kept, the oldest cut.
        assert!(
            text.contains("event99") && !text.contains("event0 "),
            "{text}"
        );
        assert!(m.start < pr.text.find("turn 0 ").unwrap());
        assert!(pr.text[..m.start].contains("Scenario: Deep space."));
    }

    #[test]
    fn memory_can_sit_in_the_chat_at_a_depth() {
        let c = card();
        let h = history(8);
        let mut p = PromptParts::new(&c, "Ava", "", &h);
        p.memory = "They left port.";
        p.memory_budget = 50;
        p.memory_depth = Some(2);
        let pr = p.build(10_000, words);
        let m = pr.text.find("Story so far: They left port.").unwrap();
        assert!(pr.text.find("turn 5 ").unwrap() < m && m < pr.text.find("turn 6 ").unwrap());
        // Beyond the history it goes first; at 0 right before the post-history part.
        p.memory_depth = Some(0);
        let pr = p.build(10_000, words);
        assert!(
            pr.text
                .contains("They left port.</s>\n<|system|>Stay terse."),
            "{}",
            pr.text
        );
        p.memory_depth = Some(99);
        let pr = p.build(10_000, words);
        assert!(pr.text.find("They left port.").unwrap() < pr.text.find("turn 0 ").unwrap());
        // A note at the same depth follows the memory.
        let note = AuthorNote {
            text: "Note here.".into(),
            depth: 99,
            interval: 1,
        };
        p.author_note = Some(&note);
        let pr = p.build(10_000, words);
        assert!(pr.text.find("They left port.").unwrap() < pr.text.find("Note here.").unwrap());
    }

    #[test]
    fn sections_tile_the_text_in_order() {
        let c = CharacterCard {
            personality: "dry".into(),
            ..card()
        };
        let h = history(12);
        let note = AuthorNote {
            text: "Note.".into(),
            depth: 3,
            interval: 1,
        };
        let mut p = PromptParts::new(&c, "Ava", "Captain of the Wren.", &h);
        p.memory = "They left port.";
        p.memory_budget = 50;
        p.author_note = Some(&note);
        let pr = p.build(10_000, words);
        let mut at = 0;
        for s in &pr.sections {
            assert_eq!(s.start, at, "{:?} starts where the last ended", s.kind);
            assert!(s.end > s.start);
            at = s.end;
        }
        assert_eq!(at, pr.text.len());
        let kinds: Vec<SectionKind> = pr.sections.iter().map(|s| s.kind).collect();
        use SectionKind as K;
        assert_eq!(
            kinds,
            vec![
                K::SystemPrompt,
                K::Definition,
                K::Persona,
                K::Examples,
                K::Memory,
                K::History,
                K::AuthorNote,
                K::History,
                K::PostHistory,
                K::Reply
            ]
        );
        let sum: usize = pr.sections.iter().map(|s| s.tokens).sum();
        assert!(
            sum.abs_diff(pr.tokens) <= pr.sections.len(),
            "{sum} vs {}",
            pr.tokens
        );
    }
}
