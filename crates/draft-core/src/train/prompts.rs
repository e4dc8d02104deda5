//! The built-in prompt sets: DDPO's animals and the embedded model's captions.

use crate::error::{Error, Result};

/// The 45 simple animal prompts of DDPO (Black et al. 2023), used by DRaFT.
pub const ANIMALS: [&str; 45] = [
    "cat",
    "dog",
    "horse",
    "monkey",
    "rabbit",
    "zebra",
    "spider",
    "bird",
    "sheep",
    "deer",
    "cow",
    "goat",
    "lion",
    "tiger",
    "bear",
    "raccoon",
    "fox",
    "wolf",
    "lizard",
    "beetle",
    "ant",
    "butterfly",
    "fish",
    "shark",
    "whale",
    "dolphin",
    "squirrel",
    "mouse",
    "rat",
    "snake",
    "turtle",
    "frog",
    "chicken",
    "duck",
    "goose",
    "bee",
    "pig",
    "turkey",
    "fly",
    "llama",
    "camel",
    "bat",
    "gorilla",
    "hedgehog",
    "kangaroo",
];

/// Captions of the embedded shapes model (every shape and colour, none of the pairs its
/// pretraining held out).
pub const SHAPES: [&str; 8] = [
    "a large red circle on a white background",
    "a small blue square on a yellow background",
    "a large yellow triangle on a purple background",
    "a small purple circle on a black background",
    "a large green square on a white background",
    "a small white triangle on a red background",
    "a large black circle on a green background",
    "a small red square on a blue background",
];

/// A built-in prompt set by name.
pub fn prompt_set(name: &str) -> Result<Vec<String>> {
    match name {
        "animals" => Ok(ANIMALS.iter().map(|s| s.to_string()).collect()),
        "shapes" => Ok(SHAPES.iter().map(|s| s.to_string()).collect()),
        other => Err(Error::Input(format!(
            "unknown prompt set `{other}` (built-in: animals, shapes)"
        ))),
    }
}
