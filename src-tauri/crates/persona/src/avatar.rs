use serde::Serialize;

use crate::error::ValidationErrors;

/// The largest avatar file accepted.
pub const MAX_AVATAR_BYTES: usize = 4 * 1024 * 1024;
/// The largest width or height accepted, in pixels.
pub const MAX_AVATAR_SIDE: usize = 4096;

/// Image formats a WebView shows everywhere we ship.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AvatarFormat {
    /// image/png
    Png,
    /// image/jpeg
    Jpeg,
    /// image/gif
    Gif,
    /// image/webp
    Webp,
}

impl AvatarFormat {
    /// The MIME type to serve the image with.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Gif => "image/gif",
            Self::Webp => "image/webp",
        }
    }
}

/// A character's picture, checked to be an image of a known format and a sane size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Avatar {
    bytes: Vec<u8>,
    format: AvatarFormat,
}

impl Avatar {
    /// Accepts `bytes` only if they are a PNG, JPEG, GIF or WebP image whose
    /// header gives dimensions within [`MAX_AVATAR_SIDE`].
    pub fn parse(bytes: Vec<u8>) -> Result<Self, ValidationErrors> {
        let reject = |message: String| {
            let mut e = ValidationErrors::default();
            e.push("avatar", message);
            e
        };
        if bytes.len() > MAX_AVATAR_BYTES {
            return Err(reject(format!(
                "The image is {} KiB; the most an avatar can be is {} KiB.",
                bytes.len() / 1024,
                MAX_AVATAR_BYTES / 1024
            )));
        }
        let format = match imagesize::image_type(&bytes) {
            Ok(imagesize::ImageType::Png) => AvatarFormat::Png,
            Ok(imagesize::ImageType::Jpeg) => AvatarFormat::Jpeg,
            Ok(imagesize::ImageType::Gif) => AvatarFormat::Gif,
            Ok(imagesize::ImageType::Webp) => AvatarFormat::Webp,
            _ => {
                return Err(reject(
                    "This file is not a PNG, JPEG, GIF or WebP image.".into(),
                ));
            }
        };
        let size = imagesize::blob_size(&bytes)
            .map_err(|_| reject("The image file is damaged or cut short.".into()))?;
        if size.width == 0 || size.height == 0 {
            return Err(reject("The image has no pixels.".into()));
        }
        if size.width > MAX_AVATAR_SIDE || size.height > MAX_AVATAR_SIDE {
            return Err(reject(format!(
                "The image is {}×{}; avatars can be at most {MAX_AVATAR_SIDE} pixels a side.",
                size.width, size.height
            )));
        }
        Ok(Self { bytes, format })
    }

    /// Rebuilds an avatar that was validated before it was stored.
    pub fn from_trusted(bytes: Vec<u8>, format: AvatarFormat) -> Self {
        Self { bytes, format }
    }

    /// The encoded image.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Its format.
    pub fn format(&self) -> AvatarFormat {
        self.format
    }
}

impl std::str::FromStr for AvatarFormat {
    type Err = String;
    fn from_str(mime: &str) -> Result<Self, String> {
        Ok(match mime {
            "image/png" => Self::Png,
            "image/jpeg" => Self::Jpeg,
            "image/gif" => Self::Gif,
            "image/webp" => Self::Webp,
            other => return Err(format!("unknown avatar type {other}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid 1×1 PNG.
    pub(crate) const PNG_1X1: &[u8] = &[
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R', 0, 0,
        0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0, 0x1f, 0x15, 0xc4, 0x89, 0, 0, 0, 13, b'I', b'D', b'A',
        b'T', 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0, 0x1f, 0, 0x05, 0x00, 0x01, 0xff, 0x89,
        0x99, 0x3d, 0x1d, 0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82,
    ];

    #[test]
    fn png_is_accepted() {
        let a = Avatar::parse(PNG_1X1.to_vec()).unwrap();
        assert_eq!(a.format(), AvatarFormat::Png);
        assert_eq!(a.format().mime(), "image/png");
    }

    #[test]
    fn text_is_not_an_image() {
        let err = Avatar::parse(b"hello, I am a text file".to_vec()).unwrap_err();
        assert!(err.for_field("avatar").unwrap().contains("not a PNG"));
    }

    #[test]
    fn truncated_png_is_damaged() {
        let err = Avatar::parse(PNG_1X1[..12].to_vec()).unwrap_err();
        assert!(err.for_field("avatar").unwrap().contains("damaged"));
    }

    #[test]
    fn oversized_file_is_rejected() {
        let mut big = PNG_1X1.to_vec();
        big.resize(MAX_AVATAR_BYTES + 1, 0);
        let err = Avatar::parse(big).unwrap_err();
        assert!(err.for_field("avatar").unwrap().contains("KiB"));
    }
}
