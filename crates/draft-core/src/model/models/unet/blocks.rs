//! diffusers' UNet blocks. `DownBlock2D` / `CrossAttnDownBlock2D` share one struct whose
//! `attentions` list is empty for the former; likewise for the up blocks.

use burn::prelude::*;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerConfig};
use crate::error::Result;
use crate::model::var_builder::VarBuilder;

/// `DownBlock2D` (no `attentions`) or `CrossAttnDownBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        num_layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        resnet: &ResnetConfig,
        transformer: Option<&TransformerConfig>,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let c = if i == 0 { c_in } else { c_out };
            resnets.push(ResnetBlock2D::load(
                vb.pp("resnets").pp(i),
                c,
                c_out,
                resnet,
            )?);
            if let Some(t) = transformer {
                attentions.push(Transformer2DModel::load(
                    vb.pp("attentions").pp(i),
                    c_out,
                    t,
                )?);
            }
        }
        let downsamplers = if add_downsample {
            vec![Downsample2D::load(
                vb.pp("downsamplers").pp(0),
                c_out,
                downsample_padding,
            )?]
        } else {
            vec![]
        };
        Ok(Self {
            resnets,
            attentions,
            downsamplers,
        })
    }

    /// Returns the output and the skip states (one per resnet, plus the downsampled one).
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: Option<Tensor<2>>,
        context: Option<Tensor<3>>,
    ) -> (Tensor<4>, Vec<Tensor<4>>) {
        let mut states = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, temb.clone());
            if let (Some(attn), Some(ctx)) = (self.attentions.get(i), context.as_ref()) {
                x = attn.forward(x, ctx.clone());
            }
            states.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            states.push(x.clone());
        }
        (x, states)
    }
}

/// `UpBlock2D` (no `attentions`) or `CrossAttnUpBlock2D`: each resnet takes the running state
/// concatenated with one skip state from the down path.
#[derive(Module, Debug)]
pub struct UpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        c_prev_out: usize,
        num_layers: usize,
        add_upsample: bool,
        resnet: &ResnetConfig,
        transformer: Option<&TransformerConfig>,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let skip = if i == num_layers - 1 { c_in } else { c_out };
            let c = if i == 0 { c_prev_out } else { c_out };
            resnets.push(ResnetBlock2D::load(
                vb.pp("resnets").pp(i),
                c + skip,
                c_out,
                resnet,
            )?);
            if let Some(t) = transformer {
                attentions.push(Transformer2DModel::load(
                    vb.pp("attentions").pp(i),
                    c_out,
                    t,
                )?);
            }
        }
        let upsamplers = if add_upsample {
            vec![Upsample2D::load(vb.pp("upsamplers").pp(0), c_out)?]
        } else {
            vec![]
        };
        Ok(Self {
            resnets,
            attentions,
            upsamplers,
        })
    }

    /// `skips` holds this block's skip states in down-path order; they are consumed last-first.
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        mut skips: Vec<Tensor<4>>,
        temb: Option<Tensor<2>>,
        context: Option<Tensor<3>>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip state per resnet");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), temb.clone());
            if let (Some(attn), Some(ctx)) = (self.attentions.get(i), context.as_ref()) {
                x = attn.forward(x, ctx.clone());
            }
        }
        for up in &self.upsamplers {
            x = up.forward(x, upsample_size);
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    pub fn load(
        vb: VarBuilder,
        channels: usize,
        resnet: &ResnetConfig,
        transformer: &TransformerConfig,
    ) -> Result<Self> {
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::load(vb.pp("resnets").pp(0), channels, channels, resnet)?,
                ResnetBlock2D::load(vb.pp("resnets").pp(1), channels, channels, resnet)?,
            ],
            attentions: vec![Transformer2DModel::load(
                vb.pp("attentions").pp(0),
                channels,
                transformer,
            )?],
        })
    }

    pub fn forward(&self, x: Tensor<4>, temb: Tensor<2>, context: Tensor<3>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, Some(temb.clone()));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(x, context.clone());
            x = resnet.forward(x, Some(temb.clone()));
        }
        x
    }
}
