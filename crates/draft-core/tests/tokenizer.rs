//! Token ids equal Hugging Face's `CLIPTokenizer` on the real CLIP vocabulary for a corpus of
//! prompts (case, punctuation, digits, accents, other scripts, emoji, long prompts truncated
//! with the end token). Reference ids: `tests/fixtures/make_fixtures.py`.

use std::path::Path;

use draft_core::model::tokenizer::{ClipTokenizer, SpecialTokens};

#[test]
fn clip_tokenizer_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let vocab = std::fs::read_to_string(dir.join("clip-tokenizer/vocab.json")).unwrap();
    let merges = std::fs::read_to_string(dir.join("clip-tokenizer/merges.txt")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    let special = SpecialTokens {
        pad_token: cases["pad_token"].as_str().unwrap().to_string(),
        model_max_length: cases["max_length"].as_u64().unwrap() as usize,
    };
    let tok = ClipTokenizer::from_vocab_merges(&vocab, &merges, &special).unwrap();
    assert_eq!(
        tok.encode("a photo of an astronaut riding a horse")
            .unwrap()[..10],
        [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    );

    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 200, "corpus has {} prompts", cases.len());
    let mut failures = Vec::new();
    let mut truncated = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        if want[76] == tok.eos_id && want[75] != tok.eos_id && want[75] != tok.pad_id {
            truncated += 1;
        }
        let got = tok.encode(prompt).unwrap();
        if got != want {
            failures.push(format!("{prompt:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(
        truncated >= 10,
        "only {truncated} prompts exercise truncation"
    );
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
