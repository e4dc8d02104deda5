//! kohya-ss LoRA files: what A1111's built-in Lora extension and ComfyUI load for SD-1.x/2.x.
//!
//! A layer `unet.<module path>` is `lora_unet_<module path with every . as _>` and a text
//! encoder layer `text_encoder.text_model.<path>` is `lora_te_text_model_<path with _>`; each has
//! `.lora_down.weight` (peft's `A`, a conv LoRA's `[r, in, k, k]`), `.lora_up.weight` (`B`,
//! `[out, r]` or `[out, r, 1, 1]`) and `.alpha` (a scalar): the update is `alpha / r · up · down`.
//! These are the names diffusers' `convert_state_dict_to_kohya` writes.
//!
//! Underscored names cannot be turned back into dotted paths on their own (`down_blocks`,
//! `to_q`), so layers are matched by [`module_id`], the form all layouts agree on.

/// The id under which one layer's LoRA is matched whatever the file's layout: `<component>:`
/// then the module path with every `.` as `_`, without the text encoder's `text_model` level
/// (transformers 5 saves the text encoder without it, and so do LoRAs made on it).
pub fn module_id(component: &str, path: &str) -> String {
    let flat = path.replace('.', "_");
    let flat = match component {
        "text_encoder" => flat
            .strip_prefix("text_model_")
            .unwrap_or(&flat)
            .to_string(),
        _ => flat,
    };
    format!("{component}:{flat}")
}

/// The kohya name of the layer `path` of `component` (`unet`, `text_encoder`).
pub fn module_name(component: &str, path: &str) -> Option<String> {
    let flat = path.replace('.', "_");
    match component {
        "unet" => Some(format!("lora_unet_{flat}")),
        "text_encoder" => {
            let flat = flat.strip_prefix("text_model_").unwrap_or(&flat);
            Some(format!("lora_te_text_model_{flat}"))
        }
        _ => None,
    }
}

/// What a kohya key is: the layer's [`module_id`] and which of its tensors.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a kohya key into the layer's [`module_id`] and the part; `None` for a key of another
/// layout. `lora_te1_` (what diffusers' `convert_state_dict_to_kohya` writes for the one text
/// encoder of SD-1.x/2.x) is read as `lora_te_`; SDXL's second encoder, `lora_te2_`, is `None`.
pub fn parse_key(key: &str) -> Option<(String, Part)> {
    let (module, part) = if let Some(m) = key.strip_suffix(".lora_down.weight") {
        (m, Part::Down)
    } else if let Some(m) = key.strip_suffix(".lora_up.weight") {
        (m, Part::Up)
    } else if let Some(m) = key.strip_suffix(".alpha") {
        (m, Part::Alpha)
    } else {
        return None;
    };
    let id = if let Some(p) = module.strip_prefix("lora_unet_") {
        module_id("unet", p)
    } else if let Some(p) = module
        .strip_prefix("lora_te_")
        .or_else(|| module.strip_prefix("lora_te1_"))
    {
        module_id("text_encoder", p)
    } else {
        return None;
    };
    Some((id, part))
}

/// Whether a file's keys are in kohya's layout.
pub fn is_kohya<S: AsRef<str>>(keys: &[S]) -> bool {
    keys.iter().any(|k| {
        let k = k.as_ref();
        k.starts_with("lora_unet_") || k.starts_with("lora_te")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_ids() {
        let path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0";
        let name = module_name("unet", path).unwrap();
        assert_eq!(
            name,
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
        );
        let (id, part) = parse_key(&format!("{name}.lora_up.weight")).unwrap();
        assert_eq!(part, Part::Up);
        assert_eq!(id, module_id("unet", path));

        let te = "text_model.encoder.layers.0.self_attn.q_proj";
        let name = module_name("text_encoder", te).unwrap();
        assert_eq!(name, "lora_te_text_model_encoder_layers_0_self_attn_q_proj");
        assert_eq!(
            parse_key(&format!("{name}.alpha")).unwrap().0,
            module_id("text_encoder", te)
        );
        // transformers 5's path without `text_model.` is the same layer.
        assert_eq!(
            module_id("text_encoder", "encoder.layers.0.self_attn.q_proj"),
            module_id("text_encoder", te)
        );
        assert_eq!(
            parse_key("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha")
                .unwrap()
                .0,
            module_id("text_encoder", te)
        );
        assert_eq!(
            parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"),
            None
        );
    }
}
