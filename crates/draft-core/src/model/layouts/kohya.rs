//! kohya-ss LoRA files: what A1111's built-in Lora extension and ComfyUI load for SD-1.x/2.x/XL.
//!
//! A layer `unet.<module path>` is `lora_unet_<module path with every . as _>` and a text
//! encoder layer `text_encoder.text_model.<path>` is `lora_te_text_model_<path with _>`; each has
//! `.lora_down.weight` (peft's `A`, a conv LoRA's `[r, in, k, k]`), `.lora_up.weight` (`B`,
//! `[out, r]` or `[out, r, 1, 1]`) and `.alpha` (a scalar): the update is `alpha / r · up · down`.
//! These are the names diffusers' `convert_state_dict_to_kohya` writes.
//!
//! Underscored names cannot be turned back into dotted paths on their own (`down_blocks`,
//! `to_q`), so layers are matched by [`module_id`], the form all layouts agree on.
//!
//! kohya's sd-scripts names SDXL's UNet layers by the original LDM blocks instead
//! (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_…`,
//! `lora_unet_output_blocks_…`) and its towers `lora_te1_` / `lora_te2_`; those block names are
//! read as diffusers' ([`ldm_unet_name`]), for UNets with two resnets per level (every SD-1.x,
//! 2.x and XL UNet).

/// The id under which one layer's LoRA is matched whatever the file's layout: `<component>:`
/// then the module path with every `.` as `_`, without the text encoder's `text_model` level
/// (transformers 5 saves the text encoder without it, and so do LoRAs made on it).
pub fn module_id(component: &str, path: &str) -> String {
    let flat = path.replace('.', "_");
    let flat = match component {
        "text_encoder" | "text_encoder_2" => flat
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
/// layout. `lora_te1_` (SDXL's first tower, and what diffusers' `convert_state_dict_to_kohya`
/// writes for the one text encoder of SD-1.x/2.x) is read as `lora_te_`; `lora_te2_` is SDXL's
/// second tower (`text_encoder_2`); sd-scripts' LDM block names of SDXL's UNet are read as
/// diffusers' ([`ldm_unet_name`]).
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
        match ldm_unet_name(p) {
            Some(flat) => module_id("unet", &flat),
            None => module_id("unet", p),
        }
    } else if let Some(p) = module
        .strip_prefix("lora_te_")
        .or_else(|| module.strip_prefix("lora_te1_"))
    {
        module_id("text_encoder", p)
    } else if let Some(p) = module.strip_prefix("lora_te2_") {
        module_id("text_encoder_2", p)
    } else {
        return None;
    };
    Some((id, part))
}

/// An underscored LDM UNet module name (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
/// after `lora_unet_`) as diffusers' underscored path
/// (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`), for two resnets per level;
/// `None` for a name that is not in LDM's blocks (diffusers' names, which are kept).
pub fn ldm_unet_name(flat: &str) -> Option<String> {
    const LPB: usize = 2;
    fn num(s: &str) -> Option<(usize, &str)> {
        let (n, rest) = s.split_once('_').unwrap_or((s, ""));
        Some((n.parse().ok()?, rest))
    }
    let resnet = |rest: &str| -> Option<String> {
        for (ldm, diffusers) in [
            ("in_layers_0", "norm1"),
            ("in_layers_2", "conv1"),
            ("emb_layers_1", "time_emb_proj"),
            ("out_layers_0", "norm2"),
            ("out_layers_3", "conv2"),
            ("skip_connection", "conv_shortcut"),
        ] {
            if rest == ldm {
                return Some(diffusers.to_string());
            }
        }
        None
    };
    if let Some(rest) = flat.strip_prefix("input_blocks_") {
        let (i, rest) = num(rest)?;
        let (m, rest) = num(rest)?;
        let (level, j) = (
            i.checked_sub(1)? / (LPB + 1),
            (i.checked_sub(1)?) % (LPB + 1),
        );
        return match (m, j == LPB) {
            (0, true) if rest == "op" => Some(format!("down_blocks_{level}_downsamplers_0_conv")),
            (0, false) => Some(format!("down_blocks_{level}_resnets_{j}_{}", resnet(rest)?)),
            (1, false) => Some(format!("down_blocks_{level}_attentions_{j}_{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = flat.strip_prefix("middle_block_") {
        let (m, rest) = num(rest)?;
        return match m {
            0 | 2 => Some(format!("mid_block_resnets_{}_{}", m / 2, resnet(rest)?)),
            1 => Some(format!("mid_block_attentions_0_{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = flat.strip_prefix("output_blocks_") {
        let (i, rest) = num(rest)?;
        let (m, rest) = num(rest)?;
        let (level, j) = (i / (LPB + 1), i % (LPB + 1));
        return match (m, rest) {
            (0, _) => Some(format!("up_blocks_{level}_resnets_{j}_{}", resnet(rest)?)),
            (1 | 2, "conv") => Some(format!("up_blocks_{level}_upsamplers_0_conv")),
            (1, _) => Some(format!("up_blocks_{level}_attentions_{j}_{rest}")),
            _ => None,
        };
    }
    None
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
    fn sd_scripts_sdxl_names_are_diffusers_layers() {
        for (ldm, diffusers) in [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
                "down_blocks_2_attentions_1_transformer_blocks_9_ff_net_0_proj",
            ),
            (
                "input_blocks_4_0_in_layers_2",
                "down_blocks_1_resnets_0_conv1",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            ("middle_block_2_out_layers_3", "mid_block_resnets_1_conv2"),
            (
                "output_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
                "up_blocks_1_attentions_2_transformer_blocks_1_attn2_to_out_0",
            ),
            ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
            (
                "output_blocks_6_0_skip_connection",
                "up_blocks_2_resnets_0_conv_shortcut",
            ),
        ] {
            assert_eq!(ldm_unet_name(ldm).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(ldm_unet_name("down_blocks_1_attentions_0_proj_in"), None);
        let (id, _) = parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!(id, "text_encoder_2:encoder_layers_0_mlp_fc1");
    }

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
        // SDXL's second tower.
        assert_eq!(
            parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha")
                .unwrap()
                .0,
            module_id("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")
        );
    }
}
