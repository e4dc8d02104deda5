//! CLIP's byte-level BPE tokenizer through the `tokenizers` crate.
//!
//! Built either from `tokenizer.json` or, as the CompVis SD-1.x repos ship only those, from
//! `vocab.json` + `merges.txt` with the pipeline that transformers' `CLIPTokenizerFast`
//! converter assembles. Output ids follow the SD pipelines' call
//! `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`:
//! `<|startoftext|>`, at most 75 prompt tokens, `<|endoftext|>`, then padding.
//!
//! The reference is transformers' slow `CLIPTokenizer` with ftfy installed (as it is wherever
//! open_clip is): before BPE it runs `ftfy.fix_text` and a double `html.unescape`. The fast
//! pipeline does neither, so [`clean_text`] does the parts that change prompts in practice.

use std::collections::HashMap;

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::{Error, Result};

/// The standard CLIP BPE tokenizer SD-1.x/2.x were trained with (49408 tokens; the files
/// `tests/fixtures/make_fixtures.py` rebuilds from open_clip's vocabulary), as `(file name,
/// bytes)` in a diffusers `tokenizer/` folder: single-file checkpoints carry none, and both
/// shells (the CLI and the page) load them with it.
pub const CLIP_BPE_FILES: [(&str, &[u8]); 2] = [
    (
        "vocab.json",
        include_bytes!("../../../../tests/fixtures/clip-tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_bytes!("../../../../tests/fixtures/clip-tokenizer/merges.txt"),
    ),
];

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const UNK: &str = "<|unk|>";
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
}

/// The special-token settings read from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub pad_token: String,
    pub model_max_length: usize,
}

impl SpecialTokens {
    /// Reads `pad_token` and `model_max_length` from any of the given JSON files (later ones
    /// win); defaults are SD-1.x's (`<|endoftext|>`, 77).
    pub fn from_json_files(files: &[(&str, &str)]) -> Result<Self> {
        let mut out = SpecialTokens {
            pad_token: EOS.to_string(),
            model_max_length: 77,
        };
        for (name, json) in files {
            let v: Value = serde_json::from_str(json).map_err(|e| Error::Tokenizer {
                file: name.to_string(),
                reason: e.to_string(),
            })?;
            match v.get("pad_token") {
                Some(Value::String(s)) => out.pad_token = s.clone(),
                Some(Value::Object(o)) => {
                    if let Some(Value::String(s)) = o.get("content") {
                        out.pad_token = s.clone();
                    }
                }
                _ => {}
            }
            // Tokenizers saved without a limit store a huge sentinel (1e30); ignore those.
            if let Some(m) = v.get("model_max_length").and_then(Value::as_f64)
                && (1.0..1e6).contains(&m)
            {
                out.model_max_length = m as usize;
            }
        }
        Ok(out)
    }
}

/// Checks BPE merges as the `tokenizers` builder needs them (it panics on some it does not
/// check): both parts and the merged token are in the vocabulary, and the second part starts
/// with the continuing-subword prefix.
fn check_merges<'m>(
    file: &str,
    known: impl Fn(&str) -> bool,
    prefix: &str,
    merges: impl Iterator<Item = (&'m str, &'m str)>,
) -> Result<()> {
    for (i, (a, b)) in merges.enumerate() {
        let merged = b.strip_prefix(prefix).map(|rest| format!("{a}{rest}"));
        if !(known(a) && known(b) && merged.is_some_and(|m| known(&m))) {
            return Err(tok_err(
                file,
                format!(
                    "merge {} ({a:?} + {b:?}) names a token missing from the vocabulary",
                    i + 1
                ),
            ));
        }
    }
    Ok(())
}

fn tok_err(file: &str, e: impl ToString) -> Error {
    Error::Tokenizer {
        file: file.to_string(),
        reason: e.to_string(),
    }
}

impl ClipTokenizer {
    /// From `vocab.json` and `merges.txt` (the first line of merges may be a `#version` header).
    pub fn from_vocab_merges(
        vocab_json: &str,
        merges_txt: &str,
        special: &SpecialTokens,
    ) -> Result<Self> {
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).map_err(|e| tok_err("vocab.json", e))?;
        let vocab: Vocab = vocab.into_iter().collect();
        let mut merges = Vec::new();
        for (i, line) in merges_txt.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(tok_err(
                        "merges.txt",
                        format!("line {} is not `a b`: {line:?}", i + 1),
                    ));
                }
            }
        }
        check_merges(
            "merges.txt",
            |t| vocab.contains_key(t),
            "",
            merges.iter().map(|(a, b)| (a.as_str(), b.as_str())),
        )?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(EOS.to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err("merges.txt", e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(
                Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                    " ",
                )
                .map_err(|e| tok_err("vocab.json", e))?,
            ),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| tok_err("vocab.json", e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err("vocab.json", e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::default().add_prefix_space(false)),
        ])));
        // Written out in a prompt, the special tokens are matched whole, as the slow tokenizer
        // does. That includes a pad token of its own: SD-2's and SDXL's `tokenizer_2` pad with
        // `!`, so a `!` in a prompt is that token (id 0), not the BPE's `!</w>`.
        let mut specials = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
        if ![BOS, EOS].contains(&special.pad_token.as_str()) {
            specials.push(AddedToken::from(special.pad_token.clone(), true));
        }
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| tok_err("vocab.json", e))?;
        Self::finish(tokenizer, special, "vocab.json")
    }

    /// A word-level tokenizer over `words` (lower-cased, split on whitespace and punctuation;
    /// unknown words become `<|unk|>`), as the `tokenizer.json` text to save with a model.
    /// Ids: `<|startoftext|>` 0, `<|endoftext|>` 1, `<|unk|>` 2, then `words` in order.
    pub fn word_level_json(words: &[&str]) -> Result<String> {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        let mut vocab = HashMap::new();
        for (i, w) in [BOS, EOS, UNK].iter().chain(words).enumerate() {
            if vocab.insert(w.to_string(), i as u32).is_some() {
                return Err(tok_err("tokenizer.json", format!("`{w}` is listed twice")));
            }
        }
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token(UNK.to_string())
            .build()
            .map_err(|e| tok_err("tokenizer.json", e))?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::Lowercase(Lowercase)))
            .map_err(|e| tok_err("tokenizer.json", e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Whitespace(Whitespace)));
        tokenizer
            .add_special_tokens([
                AddedToken::from(BOS, true),
                AddedToken::from(EOS, true),
                AddedToken::from(UNK, true),
            ])
            .map_err(|e| tok_err("tokenizer.json", e))?;
        tokenizer
            .to_string(true)
            .map_err(|e| tok_err("tokenizer.json", e))
    }

    /// One more than the largest token id it can produce (added tokens included).
    pub fn id_bound(&self) -> usize {
        self.tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
    }

    /// Whether `word` is in the vocabulary (for word-level tokenizers: whether a prompt word
    /// is known).
    pub fn knows(&self, word: &str) -> bool {
        self.tokenizer.token_to_id(word).is_some()
    }

    /// The words of `prompt` that map to the unknown token, if the vocabulary has one.
    pub fn unknown_words(&self, prompt: &str) -> Vec<String> {
        let Some(unk) = self.tokenizer.token_to_id(UNK) else {
            return Vec::new();
        };
        let text = clean_text(prompt);
        match self.tokenizer.encode(text.as_str(), false) {
            Ok(enc) => enc
                .get_ids()
                .iter()
                .zip(enc.get_offsets())
                .filter(|(id, _)| **id == unk)
                .filter_map(|(_, &(a, b))| text.get(a..b).map(str::to_string))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// From a `tokenizer.json` file.
    pub fn from_tokenizer_json(bytes: &[u8], special: &SpecialTokens) -> Result<Self> {
        let json: Value =
            serde_json::from_slice(bytes).map_err(|e| tok_err("tokenizer.json", e))?;
        let model = &json["model"];
        if model["type"] == "BPE"
            && let (Some(vocab), Some(merges)) =
                (model["vocab"].as_object(), model["merges"].as_array())
        {
            let prefix = model["continuing_subword_prefix"].as_str().unwrap_or("");
            // Merges as "a b" or ["a", "b"]; other forms are the deserializer's to refuse.
            let pairs = merges.iter().filter_map(|m| match m {
                Value::String(s) => s.split_once(' '),
                Value::Array(p) if p.len() == 2 => p[0].as_str().zip(p[1].as_str()),
                _ => None,
            });
            check_merges("tokenizer.json", |t| vocab.contains_key(t), prefix, pairs)?;
        }
        let tokenizer = Tokenizer::from_bytes(bytes).map_err(|e| tok_err("tokenizer.json", e))?;
        Self::finish(tokenizer, special, "tokenizer.json")
    }

    fn finish(tokenizer: Tokenizer, special: &SpecialTokens, file: &str) -> Result<Self> {
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| tok_err(file, format!("the vocabulary has no `{t}` token")))
        };
        if special.model_max_length < 2 {
            return Err(tok_err(file, "model_max_length must be at least 2"));
        }
        // A pipeline that cannot encode (a word-level model without its unknown token, …) is
        // refused here, naming the file, rather than at the first prompt.
        tokenizer
            .encode("a photo of an unheard-of ☃ zyxwvut, 42", false)
            .map_err(|e| tok_err(file, format!("cannot encode a test prompt: {e}")))?;
        Ok(Self {
            bos_id: id(BOS)?,
            eos_id: id(EOS)?,
            pad_id: id(&special.pad_token)?,
            max_length: special.model_max_length,
            tokenizer,
        })
    }

    /// `max_length` ids: BOS, the prompt's tokens (truncated), EOS, padding.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(clean_text(prompt), false)
            .map_err(|e| tok_err("tokenizer", e))?;
        let body = encoding.get_ids();
        let body = &body[..body.len().min(self.max_length - 2)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(body);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }
}

/// The parts of the slow tokenizer's `basic_clean` (ftfy's `fix_text`, then `html.unescape`
/// twice) that the fast pipeline lacks: HTML entities, curly quotes, Latin ligatures and
/// full-width characters. NFC and whitespace folding happen in the normalizer.
pub fn clean_text(text: &str) -> String {
    let mut s = text.to_string();
    for _ in 0..3 {
        // ftfy unescapes once when the text has no other markup, then basic_clean twice.
        let next = html_unescape(&s);
        if next == s {
            break;
        }
        s = next;
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => out.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => out.push('"'),
            '\u{FB00}' => out.push_str("ff"),
            '\u{FB01}' => out.push_str("fi"),
            '\u{FB02}' => out.push_str("fl"),
            '\u{FB03}' => out.push_str("ffi"),
            '\u{FB04}' => out.push_str("ffl"),
            '\u{FB05}' => out.push_str("\u{17F}t"),
            '\u{FB06}' => out.push_str("st"),
            '\u{3000}' => out.push(' '),
            '\u{FF01}'..='\u{FF5E}' => {
                out.push(char::from_u32(c as u32 - 0xFF01 + 0x21).unwrap_or(c))
            }
            _ => out.push(c),
        }
    }
    out
}

/// Python's `html.unescape` for named entities common in prompts and numeric references.
fn html_unescape(s: &str) -> String {
    const NAMED: &[(&str, &str)] = &[
        ("amp", "&"),
        ("lt", "<"),
        ("gt", ">"),
        ("quot", "\""),
        ("apos", "'"),
        ("nbsp", "\u{A0}"),
        ("copy", "\u{A9}"),
        ("reg", "\u{AE}"),
        ("hellip", "\u{2026}"),
        ("mdash", "\u{2014}"),
        ("ndash", "\u{2013}"),
    ];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest[1..].find(';').map(|e| e + 1).filter(|&e| e <= 12);
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let num = if let Some(hex) = name.strip_prefix("#x").or_else(|| name.strip_prefix("#X"))
            {
                u32::from_str_radix(hex, 16).ok()
            } else if let Some(dec) = name.strip_prefix('#') {
                dec.parse().ok()
            } else {
                None
            };
            let text = match num {
                Some(n) => char::from_u32(n).map(String::from),
                None => NAMED
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string()),
            };
            text.map(|t| (t, e + 1))
        });
        match decoded {
            Some((text, len)) => {
                out.push_str(&text);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}
