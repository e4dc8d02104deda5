//! `draft convert IN OUT.safetensors`: a PyTorch pickle (`.pt`, `.pth`, `.bin`, `.ckpt`) written
//! as safetensors, for the browser page, which reads no pickles. The same conversion
//! `--reward-model` and `--model` do in memory ([`crate::files::read_weights`]): a
//! `state_dict.` nesting and a DDP `module.` prefix dropped, float64 written as float32.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The PyTorch weights file: .pt, .pth, .bin or .ckpt (e.g. HPSv2's HPS_v2.1_compressed.pt,
    /// the LAION aesthetic MLP's .pth, a diffusers or transformers pytorch_model.bin).
    #[arg(value_name = "IN")]
    input: PathBuf,
    /// The safetensors file to write (its name must end in .safetensors).
    #[arg(value_name = "OUT.safetensors")]
    output: PathBuf,
    /// Overwrite OUT if it exists.
    #[arg(long)]
    force: bool,
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let (input, output) = (&a.input, &a.output);
    let name = input.display();
    if extension(output) != "safetensors" {
        bail!(
            "{}: the output's name must end in .safetensors",
            output.display()
        );
    }
    match extension(input).as_str() {
        "safetensors" => {
            bail!("{name}: already safetensors, nothing to convert (the page reads it as it is)")
        }
        "pt" | "pth" | "bin" | "ckpt" => {}
        _ => bail!("{name}: expected a PyTorch .pt/.pth/.bin/.ckpt file"),
    }
    if input.is_dir() {
        bail!("{name}: is a folder, expected a PyTorch weights file");
    }
    if !input.is_file() {
        bail!("{name}: not found");
    }
    if output.is_dir() {
        bail!("{}: is a folder", output.display());
    }
    if output.exists() && !a.force {
        bail!(
            "{}: already exists (--force to overwrite)",
            output.display()
        );
    }
    let (_, bytes) = crate::files::read_weights(input)?;
    let written = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{name}: converted file does not parse: {e}"))?;
    let names: BTreeSet<String> = written.names().into_iter().map(str::to_string).collect();
    let left_out = left_out(input, &names);
    crate::files::write_atomic(output, &bytes)?;
    if !left_out.is_empty() {
        let shown: Vec<&str> = left_out.iter().take(5).map(String::as_str).collect();
        let more = left_out.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        eprintln!(
            "draft: note: {name}: {} tensor(s) of a type no weight reader uses (bool, int8/16, \
             unsigned) left out: {}{more}",
            left_out.len(),
            shown.join(", "),
        );
    }
    eprintln!(
        "draft: wrote {} ({} tensor{}, {:.1} MB)",
        output.display(),
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        bytes.len() as f64 / 1e6
    );
    Ok(())
}

/// The tensors of the state dict that the conversion skipped (the dtypes safetensors readers
/// here have no use for), under their converted names. Empty if the file cannot be listed.
fn left_out(input: &Path, written: &BTreeSet<String>) -> Vec<String> {
    let Ok(reader) = pytorch_reader::PytorchReader::new(input) else {
        return Vec::new();
    };
    let all = reader.tensors();
    let nested = all.keys().any(|k| k.starts_with("state_dict."));
    let mut out: Vec<String> = all
        .keys()
        .filter(|k| !nested || k.starts_with("state_dict."))
        .map(|k| {
            let k = k.strip_prefix("state_dict.").unwrap_or(k);
            k.strip_prefix("module.").unwrap_or(k).to_string()
        })
        .filter(|k| !written.contains(k))
        .collect();
    out.sort();
    out
}
