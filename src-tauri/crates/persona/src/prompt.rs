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
