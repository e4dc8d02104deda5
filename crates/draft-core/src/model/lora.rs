//! LoRA (Hu et al. 2021) on `Linear` and `Conv2d` layers, in peft's parameterisation and
//! diffusers' file layout.
//!
//! An adapted layer computes `x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` with `A` [r, in] and `B` [out, r]
//! (PyTorch layout, as peft stores them) and `s = alpha / r`. A conv layer's `A` is a conv with
//! the layer's kernel, stride and padding into `r` channels and its `B` a 1×1 conv out of them,
//! as peft's `lora.Conv2d`. The dense `W + s·B·A` is formed for passes without gradient
//! ([`LoraSlot::merged_linear`]), on every device; with gradient the adapters run apart.
//!
//! The adapters live in a [`LoraTable`] shared by every adapted layer of a pipeline. Layers
//! hold a slot index into it, so the trainer changes all adapters at once without walking the
//! model. A change is either permanent (an optimiser step, a checkpoint restored:
//! [`LoraTable::set_params`]) or scoped: [`LoraTable::scoped_params`] (autodiff leaves for a
//! pass with gradient) and [`LoraTable::scoped_trainable_scale`] (the slider's evaluation)
//! return a [`LoraScope`] that takes the change back when it is dropped — at the end of the
//! block, on an early return, a panic, or a future dropped at an await — whatever the order in
//! which scopes end. Which layers get a slot is decided at load time by a [`LoraPlan`] carried
//! by the [`VarBuilder`](crate::model::var_builder::VarBuilder).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::prelude::*;
use burn::tensor::module::{conv2d, linear};
use burn::tensor::ops::ConvOptions;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::layouts::kohya::{self, module_id};
use crate::model::weights::Weights;

/// What an adapted layer is: the shapes and conv options its adapter needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKind {
    Linear {
        d_in: usize,
        d_out: usize,
    },
    Conv {
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        pad: (usize, usize),
    },
}

impl LoraKind {
    /// `A`'s shape as peft stores it: [r, in] or [r, in, k, k].
    pub fn a_shape(&self, rank: usize) -> Vec<usize> {
        match *self {
            LoraKind::Linear { d_in, .. } => vec![rank, d_in],
            LoraKind::Conv { c_in, kernel, .. } => vec![rank, c_in, kernel, kernel],
        }
    }

    /// `B`'s shape as peft stores it: [out, r] or [out, r, 1, 1].
    pub fn b_shape(&self, rank: usize) -> Vec<usize> {
        match *self {
            LoraKind::Linear { d_out, .. } => vec![d_out, rank],
            LoraKind::Conv { c_out, .. } => vec![c_out, rank, 1, 1],
        }
    }

    /// The fan-in of `A` (its matrix width).
    pub fn fan_in(&self) -> usize {
        match *self {
            LoraKind::Linear { d_in, .. } => d_in,
            LoraKind::Conv { c_in, kernel, .. } => c_in * kernel * kernel,
        }
    }

    pub fn fan_out(&self) -> usize {
        match *self {
            LoraKind::Linear { d_out, .. } => d_out,
            LoraKind::Conv { c_out, .. } => c_out,
        }
    }
}

/// One low-rank update: `A` [r, fan_in] and `B` [out, r] as matrices, and its scale.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Tensor<2>,
    pub b: Tensor<2>,
    pub scale: f64,
}

/// One adapted layer: its key in the LoRA file layout (`unet.<module path>`), what it is,
/// and the adapters summed into its output.
#[derive(Debug, Clone)]
pub struct LoraEntry {
    pub key: String,
    pub kind: LoraKind,
    /// In the table: the permanent adapters, under the scoped changes in force; from
    /// [`LoraTable::entries`]: the adapters as the layer sees them.
    pub adapters: Vec<Adapter>,
    /// The layer's weight with the adapters folded in ([`LoraSlot::merged_linear`]), each
    /// with the state of the table it was made for. Only states that are in force or come
    /// back when scopes end are kept, and none while a scope with autodiff leaves begins
    /// ([`LoraTable::scoped_params`]): its pass with gradient runs the adapters apart, and
    /// its backward gets the copies' memory. A scoped scale (the slider's evaluation) holds a
    /// second copy while it lasts.
    merged: Vec<(StateKey, Tensor<2>)>,
}

/// The adapters of every adapted layer of a pipeline, shared by those layers.
#[derive(Debug, Clone, Default)]
pub struct LoraTable(Arc<Mutex<Inner>>);

#[derive(Debug, Default)]
struct Inner {
    entries: Vec<LoraEntry>,
    /// The scoped changes in force, oldest first, each with its scope's token; applied in
    /// this order on top of the permanent adapters.
    scopes: Vec<(u64, Change)>,
    /// The permanent state's id: a new one at every permanent change.
    version: u64,
    /// Where versions and tokens come from (never reused).
    next_id: u64,
}

/// What the layers see: a permanent state and the scoped changes on top of it, in order. A
/// scope's change never changes, so equal keys mean equal adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StateKey {
    version: u64,
    scopes: Vec<u64>,
}

/// A scoped change of the trainable (first) adapter of every layer.
#[derive(Debug)]
enum Change {
    /// `A` and `B` by entry index (`None` for an entry without an adapter).
    Params(Vec<Option<(Tensor<2>, Tensor<2>)>>),
    Scale(f64),
}

impl Inner {
    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn key(&self) -> StateKey {
        StateKey {
            version: self.version,
            scopes: self.scopes.iter().map(|(token, _)| *token).collect(),
        }
    }

    /// The entries, to change them permanently: a new version, and the merged weights made
    /// for the earlier ones dropped (no state of theirs can come back).
    fn entries_mut(&mut self) -> &mut Vec<LoraEntry> {
        self.version = self.fresh_id();
        self.entries.iter_mut().for_each(|e| e.merged.clear());
        &mut self.entries
    }

    /// Entry `index`'s adapters as the layers see them: the scoped changes applied in order.
    fn adapters(&self, index: usize) -> Vec<Adapter> {
        let mut adapters = self.entries[index].adapters.clone();
        if let Some(first) = adapters.first_mut() {
            for (_, change) in &self.scopes {
                match change {
                    Change::Params(params) => {
                        if let Some(Some((a, b))) = params.get(index) {
                            first.a = a.clone();
                            first.b = b.clone();
                        }
                    }
                    Change::Scale(scale) => first.scale = *scale,
                }
            }
        }
        adapters
    }

    fn begin_scope(&mut self, change: Change) -> u64 {
        let token = self.fresh_id();
        self.scopes.push((token, change));
        token
    }

    /// Takes scope `token`'s change back; the merged weights made while it was in force go
    /// (no state with it can come back).
    fn end_scope(&mut self, token: u64) {
        self.scopes.retain(|(t, _)| *t != token);
        for e in &mut self.entries {
            e.merged.retain(|(key, _)| !key.scopes.contains(&token));
        }
    }
}

/// A scoped change of a [`LoraTable`] ([`LoraTable::scoped_params`],
/// [`LoraTable::scoped_trainable_scale`]): in force until this is dropped, however that
/// happens. Scopes may nest and end in any order; each takes back its own change only.
#[must_use = "the change lasts as long as the scope: bind it (`let _scope = …`)"]
#[derive(Debug)]
pub struct LoraScope<'t> {
    table: &'t LoraTable,
    token: u64,
}

impl Drop for LoraScope<'_> {
    fn drop(&mut self) {
        self.table.lock().end_scope(self.token);
    }
}

/// A layer's handle into the [`LoraTable`].
#[derive(Debug, Clone)]
pub struct LoraSlot {
    table: LoraTable,
    index: usize,
}

impl LoraSlot {
    /// The adapters, in `dtype` (the layer input's: f32 LoRA weights run in f16 with
    /// activations in f16, as peft runs them in a float16 pipeline).
    fn adapters(&self, dtype: burn::tensor::DType) -> Vec<Adapter> {
        let mut adapters = self.table.lock().adapters(self.index);
        for ad in &mut adapters {
            ad.a = crate::tensor::in_dtype(ad.a.clone(), dtype);
            ad.b = crate::tensor::in_dtype(ad.b.clone(), dtype);
        }
        adapters
    }

    /// A `Linear` layer's stored `[in, out]` weight `w` plus `Σ s·Aᵀ·Bᵀ`, in f32 whatever w's
    /// dtype, for an input `x` that no gradient flows through: the layer then runs as one
    /// matrix product, where the adapters' two thin products, their scale and the sum into
    /// the output cost sd1-tiny's sampling ~4% on the CPU (docs/benchmarks.md) and four
    /// dispatches per layer on a GPU. Made once for the adapters as they are (a training
    /// step's whole sampling chain) and kept in the table for that state of the table — across
    /// the scopes that change it for a while ([`LoraScope`]) — until a permanent change or a
    /// pass with gradient ([`LoraTable::scoped_params`]); `None` where the adapters run apart:
    /// a pass with gradient (x or an adapter tracked).
    ///
    /// A copy never holds more than the stored weight: f32 weights fold into an f32 copy
    /// (`W + s·B·A` exactly); f16 (bf16) weights fold only for a pass that computes in their
    /// dtype, `W + s·B·A` made in f32 and rounded once — what the pass would use were the
    /// adapters added to an f32 copy and cast per use. A pass in f32 over f16 weights runs the
    /// adapters apart: an f32 copy would double the adapted layers' memory (3.8 GB for SDXL's
    /// attention), for the few percent the thin products cost.
    pub fn merged_linear<const D: usize>(&self, w: &Tensor<2>, x: &Tensor<D>) -> Option<Tensor<2>> {
        self.merged(w.dtype(), x.dtype(), x.is_tracked(), |adapters| {
            adapters.iter().fold(as_f32(w), |w, ad| {
                w + scaled(ad.a.clone().transpose(), ad.scale).matmul(ad.b.clone().transpose())
            })
        })
    }

    /// As [`merged_linear`](Self::merged_linear), for a `Conv2d` layer's `[out, in, k, k]`
    /// weight: `w + Σ s·B·A`, A `[r, in·k·k]` being the adapter's conv with the layer's kernel
    /// and options and B its 1×1 conv.
    pub fn merged_conv(&self, w: &Tensor<4>, x: &Tensor<4>) -> Option<Tensor<4>> {
        let dims = w.dims();
        let merged = self.merged(w.dtype(), x.dtype(), x.is_tracked(), |adapters| {
            adapters.iter().fold(as_f32(w).flatten::<2>(1, 3), |w, ad| {
                w + scaled(ad.b.clone(), ad.scale).matmul(ad.a.clone())
            })
        })?;
        Some(merged.reshape(dims))
    }

    /// The entry's merged weight, made by `merge` from the adapters when there is none yet;
    /// see [`merged_linear`](Self::merged_linear) for when.
    fn merged(
        &self,
        w_dtype: burn::tensor::DType,
        x_dtype: burn::tensor::DType,
        x_tracked: bool,
        merge: impl FnOnce(&[Adapter]) -> Tensor<2>,
    ) -> Option<Tensor<2>> {
        use burn::tensor::DType;
        let folds = match w_dtype {
            DType::F32 => true,
            DType::F16 | DType::BF16 => x_dtype == w_dtype,
            _ => false,
        };
        if x_tracked || !folds {
            return None;
        }
        let mut inner = self.table.lock();
        let key = inner.key();
        if let Some((_, m)) = inner.entries[self.index]
            .merged
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Some(m.clone());
        }
        let adapters = inner.adapters(self.index);
        let plain = |t: &Tensor<2>| !t.is_tracked() && t.dtype() == DType::F32;
        if adapters.is_empty() || !adapters.iter().all(|ad| plain(&ad.a) && plain(&ad.b)) {
            return None;
        }
        let m = crate::tensor::in_dtype(merge(&adapters), w_dtype);
        inner.entries[self.index].merged.push((key, m.clone()));
        Some(m)
    }

    /// `x·Aᵀ·Bᵀ·s` summed over the adapters, for a `Linear` input `[.., in]`.
    pub fn linear<const D: usize>(&self, x: &Tensor<D>, mut y: Tensor<D>) -> Tensor<D> {
        let adapters = self.adapters(x.dtype());
        if adapters.is_empty() {
            return y;
        }
        // As [rows, in]: one 2-d matrix product per factor (a `[.., in]` input would be a
        // batched product with the factor broadcast, several times slower at rank 4 on the CPU).
        let x2 = x.clone().flatten::<2>(0, D - 2);
        let dims = y.dims();
        for ad in adapters {
            // The scale on the rank-r intermediate: r columns to multiply, not the output's.
            let h = scaled(linear(x2.clone(), ad.a.transpose(), None), ad.scale);
            y = y + linear(h, ad.b.transpose(), None).reshape(dims);
        }
        y
    }

    /// The conv adapters' contribution for a `Conv2d` input, computed in f32 whatever x's
    /// dtype (convolutions in f16 accumulate in f16 on some of Burn's kernels:
    /// [`crate::ops::stored_weight`]) and added in y's.
    pub fn conv(&self, x: &Tensor<4>, mut y: Tensor<4>, options: &ConvOptions<2>) -> Tensor<4> {
        let kind = self.table.lock().entries[self.index].kind;
        let LoraKind::Conv { c_in, kernel, .. } = kind else {
            return y;
        };
        let x = crate::tensor::in_dtype(x.clone(), burn::tensor::DType::F32);
        let out_dtype = y.dtype();
        for ad in self.adapters(burn::tensor::DType::F32) {
            let [r, _] = ad.a.dims();
            let [out, _] = ad.b.dims();
            let a = ad.a.reshape([r, c_in, kernel, kernel]);
            let h = scaled(conv2d(x.clone(), a, None, options.clone()), ad.scale);
            let b = ad.b.reshape([out, r, 1, 1]);
            let pointwise = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
            y = y + crate::tensor::in_dtype(conv2d(h, b, None, pointwise), out_dtype);
        }
        y
    }
}

/// A weight in f32, the folded copies' dtype (not `nn::in_f32`, which runs a closure in f32).
fn as_f32<const D: usize>(w: &Tensor<D>) -> Tensor<D> {
    crate::tensor::in_dtype(w.clone(), burn::tensor::DType::F32)
}

fn scaled<const D: usize>(h: Tensor<D>, scale: f64) -> Tensor<D> {
    if scale == 1.0 { h } else { h * scale }
}

/// Groups of layers LoRA can adapt (`--lora-targets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraTarget {
    /// The UNet's attention projections `to_q`, `to_k`, `to_v`, `to_out.0` (attn1 and attn2).
    Attn,
    /// The UNet transformer blocks' feed-forward `ff.net.0.proj` and `ff.net.2`.
    Ff,
    /// The transformers' `proj_in` / `proj_out` (1×1 convs in SD-1, linear in SD-2).
    Proj,
    /// The UNet resnets' 3×3 convolutions `conv1` and `conv2`.
    Conv,
    /// The text encoder's attention `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    Text,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 5] = [Self::Attn, Self::Ff, Self::Proj, Self::Conv, Self::Text];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Attn => "attn",
            Self::Ff => "ff",
            Self::Proj => "proj",
            Self::Conv => "conv",
            Self::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown LoRA target `{s}` (expected one of attn, ff, proj, conv, text)"
                ))
            })
    }

    /// Whether the layer at `path` of `component` belongs to this group.
    fn matches(&self, component: &str, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or("");
        match (self, component) {
            (Self::Attn, "unet") => {
                (path.contains(".attn1.") || path.contains(".attn2."))
                    && (matches!(last, "to_q" | "to_k" | "to_v") || path.ends_with("to_out.0"))
            }
            (Self::Ff, "unet") => path.ends_with(".ff.net.0.proj") || path.ends_with(".ff.net.2"),
            (Self::Proj, "unet") => matches!(last, "proj_in" | "proj_out"),
            (Self::Conv, "unet") => path.contains(".resnets.") && matches!(last, "conv1" | "conv2"),
            (Self::Text, "text_encoder") => {
                path.contains(".self_attn.")
                    && matches!(last, "q_proj" | "k_proj" | "v_proj" | "out_proj")
            }
            _ => false,
        }
    }
}

/// Which layers of one component get a slot in `table` when the component is loaded.
#[derive(Debug, Clone)]
pub struct LoraPlan {
    pub table: LoraTable,
    pub component: String,
    select: Selection,
}

#[derive(Debug, Clone)]
enum Selection {
    Targets(Vec<LoraTarget>),
    /// Exactly these layers, by [`module_id`] (the ones a LoRA file names).
    Paths(BTreeSet<String>),
}

impl LoraPlan {
    pub fn targets(table: &LoraTable, component: &str, targets: &[LoraTarget]) -> Self {
        Self {
            table: table.clone(),
            component: component.into(),
            select: Selection::Targets(targets.to_vec()),
        }
    }

    pub fn paths(table: &LoraTable, component: &str, paths: BTreeSet<String>) -> Self {
        Self {
            table: table.clone(),
            component: component.into(),
            select: Selection::Paths(paths),
        }
    }

    /// A slot for the layer at `path` if the plan selects it.
    pub fn slot(&self, path: &str, kind: LoraKind) -> Option<LoraSlot> {
        let selected = match &self.select {
            Selection::Targets(t) => t.iter().any(|t| t.matches(&self.component, path)),
            Selection::Paths(p) => p.contains(&module_id(&self.component, path)),
        };
        selected.then(|| {
            let key = format!("{}.{}", self.component, path);
            LoraSlot {
                table: self.table.clone(),
                index: self.table.register(key, kind),
            }
        })
    }
}

/// One layer's adapter as a LoRA file holds it.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The layer's name in the file (for messages).
    pub key: String,
    pub a: Vec<f32>,
    pub a_shape: Vec<usize>,
    /// `B` with the file's scale folded in (kohya's `alpha / r`; diffusers files carry none).
    pub b: Vec<f32>,
    pub b_shape: Vec<usize>,
}

/// A LoRA file's contents: layer id ([`module_id`]) → adapter.
pub struct LoraFile {
    pub name: String,
    pub modules: BTreeMap<String, LoraModule>,
}

/// A layer key of the [`LoraTable`] (`unet.<path>`) as its [`module_id`].
fn entry_id(key: &str) -> String {
    let (component, path) = key.split_once('.').unwrap_or(("", key));
    module_id(component, path)
}

impl LoraFile {
    /// Reads a LoRA file in diffusers / peft layout (keys `<component>.<module path>.lora_A.weight`
    /// and `….lora_B.weight`, with or without the text encoder's `text_model.`) or in kohya's
    /// (`lora_unet_….lora_down.weight`, `.lora_up.weight`, `.alpha`; see [`kohya`]).
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self> {
        let w = Weights::from_bytes(name, bytes)?;
        let keys = w.keys();
        let modules = if kohya::is_kohya(&keys) {
            parse_kohya(name, &w)?
        } else {
            parse_peft(name, &w)?
        };
        if modules.is_empty() {
            return Err(Error::Input(format!(
                "{name}: the file holds no LoRA weights"
            )));
        }
        Ok(Self {
            name: name.into(),
            modules,
        })
    }

    /// The layer ids ([`module_id`]) of one component (`unet`, `text_encoder`).
    pub fn paths(&self, component: &str) -> BTreeSet<String> {
        let prefix = format!("{component}:");
        self.modules
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect()
    }

    pub fn rank(&self) -> usize {
        self.modules.values().next().map_or(0, |m| m.a_shape[0])
    }
}

fn parse_peft(name: &str, w: &Weights) -> Result<BTreeMap<String, LoraModule>> {
    let mut a_keys = BTreeMap::new();
    let mut b_keys = BTreeMap::new();
    for key in w.keys() {
        if let Some(m) = key.strip_suffix(".lora_A.weight") {
            a_keys.insert(m.to_string(), key.clone());
        } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
            b_keys.insert(m.to_string(), key.clone());
        } else {
            return Err(Error::Input(format!(
                "{name}: `{key}` is not a LoRA weight (expected keys ending in .lora_A.weight / .lora_B.weight, or kohya's lora_unet_…)"
            )));
        }
    }
    let mut modules = BTreeMap::new();
    for (m, ak) in &a_keys {
        let bk = b_keys
            .get(m)
            .ok_or_else(|| Error::Input(format!("{name}: `{ak}` has no matching lora_B.weight")))?;
        let (a, a_shape) = w.read_f32(ak)?;
        let (b, b_shape) = w.read_f32(bk)?;
        check_ranks(name, m, &a_shape, &b_shape)?;
        let (component, path) = m.split_once('.').unwrap_or(("", m));
        modules.insert(
            module_id(component, path),
            LoraModule {
                key: m.clone(),
                a,
                a_shape,
                b,
                b_shape,
            },
        );
    }
    if let Some(m) = b_keys.keys().find(|m| !a_keys.contains_key(*m)) {
        return Err(Error::Input(format!(
            "{name}: `{m}.lora_B.weight` has no matching lora_A.weight"
        )));
    }
    Ok(modules)
}

fn parse_kohya(name: &str, w: &Weights) -> Result<BTreeMap<String, LoraModule>> {
    // id → (module name, down key, up key, alpha key)
    let mut layers: BTreeMap<String, [Option<String>; 4]> = BTreeMap::new();
    for key in w.keys() {
        let Some((id, part)) = kohya::parse_key(&key) else {
            return Err(Error::Input(format!(
                "{name}: `{key}` is not a kohya LoRA weight of an SD-1.x/2.x/XL layer (expected lora_unet_… / lora_te_… / lora_te1_… / lora_te2_… with .lora_down.weight, .lora_up.weight, .alpha)"
            )));
        };
        let module = key.split('.').next().unwrap_or(&key).to_string();
        let slot = layers.entry(id).or_default();
        slot[0] = Some(module);
        let i = match part {
            kohya::Part::Down => 1,
            kohya::Part::Up => 2,
            kohya::Part::Alpha => 3,
        };
        slot[i] = Some(key.clone());
    }
    let mut modules = BTreeMap::new();
    for (id, [module, down, up, alpha]) in layers {
        let module = module.expect("set with any part");
        let (Some(down), Some(up)) = (down, up) else {
            return Err(Error::Input(format!(
                "{name}: `{module}` needs both lora_down.weight and lora_up.weight"
            )));
        };
        let (a, a_shape) = w.read_f32(&down)?;
        let (b, b_shape) = w.read_f32(&up)?;
        check_ranks(name, &module, &a_shape, &b_shape)?;
        let rank = a_shape[0];
        // No alpha, or alpha 0 (as kohya's sd-scripts reads it), means alpha = rank: scale 1.
        let alpha = match alpha {
            None => rank as f64,
            Some(k) => {
                let v = match w.read_f32(&k) {
                    Ok((v, _)) => v.first().map(|x| *x as f64),
                    Err(Error::TensorDtype { .. }) => w.read_i64(&k)?.0.first().map(|x| *x as f64),
                    Err(e) => return Err(e),
                };
                match v.filter(|a| a.is_finite()) {
                    Some(0.0) => rank as f64,
                    Some(a) => a,
                    None => {
                        return Err(Error::Input(format!(
                            "{name}: `{k}` is not one finite number"
                        )));
                    }
                }
            }
        };
        let scale = alpha / rank as f64;
        let b: Vec<f32> = b.iter().map(|v| (*v as f64 * scale) as f32).collect();
        if b.iter().any(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "{name}: `{module}`: alpha {alpha} / rank {rank} scales lora_up.weight past f32's range"
            )));
        }
        modules.insert(
            id,
            LoraModule {
                key: module,
                a,
                a_shape,
                b,
                b_shape,
            },
        );
    }
    Ok(modules)
}

fn check_ranks(name: &str, module: &str, a_shape: &[usize], b_shape: &[usize]) -> Result<()> {
    let ranks_agree = a_shape.len() >= 2
        && b_shape.len() >= 2
        && a_shape[0] == b_shape[1]
        && a_shape[0] > 0
        && b_shape[2..].iter().all(|&d| d == 1);
    if !ranks_agree {
        return Err(Error::Input(format!(
            "{name}: `{module}` has lora_A {a_shape:?} and lora_B {b_shape:?}, whose ranks disagree"
        )));
    }
    Ok(())
}

impl LoraTable {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind (no change is made in
        // several locked steps): keep going with it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, key: String, kind: LoraKind) -> usize {
        let mut inner = self.lock();
        let entries = inner.entries_mut();
        entries.push(LoraEntry {
            key,
            kind,
            adapters: Vec::new(),
            merged: Vec::new(),
        });
        entries.len() - 1
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// The entries with their adapters as the layers see them (the scopes in force applied).
    pub fn entries(&self) -> Vec<LoraEntry> {
        let inner = self.lock();
        (0..inner.entries.len())
            .map(|i| LoraEntry {
                key: inner.entries[i].key.clone(),
                kind: inner.entries[i].kind,
                adapters: inner.adapters(i),
                merged: Vec::new(),
            })
            .collect()
    }

    /// Number of LoRA parameters of the first (trainable) adapter of every layer.
    pub fn num_params(&self) -> usize {
        self.lock()
            .entries
            .iter()
            .filter_map(|e| e.adapters.first())
            .map(|a| a.a.dims().iter().product::<usize>() + a.b.dims().iter().product::<usize>())
            .sum()
    }

    /// Gives every layer a fresh trainable adapter as peft initialises one: `A` Kaiming-uniform
    /// (bound 1/√fan_in), `B` zero, so training starts from the base model.
    pub fn init_trainable(&self, rank: usize, alpha: f64, seed: u64, device: &Device) {
        let mut rng = rand_uniform(seed);
        let mut inner = self.lock();
        for e in inner.entries_mut().iter_mut() {
            let fan_in = e.kind.fan_in();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a: Vec<f32> = (0..rank * fan_in)
                .map(|_| ((rng() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let a = Tensor::from_data(TensorData::new(a, [rank, fan_in]), device);
            let b = Tensor::zeros([e.kind.fan_out(), rank], device);
            e.adapters = vec![Adapter {
                a,
                b,
                scale: alpha / rank as f64,
            }];
        }
    }

    /// Loads `file` as the trainable adapter of every layer it names (the file's `B` includes
    /// the scale; it is divided by `alpha / rank` so that training goes on in peft's
    /// parameterisation). Layers the file does not name keep their fresh adapter.
    pub fn load_trainable(&self, file: &LoraFile, alpha: f64, device: &Device) -> Result<()> {
        let mut inner = self.lock();
        let entries = inner.entries_mut();
        let mut matched = 0;
        for e in entries.iter_mut() {
            let Some(LoraModule {
                a,
                a_shape,
                b,
                b_shape,
                ..
            }) = file.modules.get(&entry_id(&e.key))
            else {
                continue;
            };
            let rank = a_shape[0];
            check_shapes(&file.name, e, rank, a_shape, b_shape)?;
            let scale = alpha / rank as f64;
            if let Some(ad) = e.adapters.first()
                && ad.a.dims()[0] != rank
            {
                return Err(Error::Input(format!(
                    "{}: `{}` has rank {rank}, but training uses rank {}",
                    file.name,
                    e.key,
                    ad.a.dims()[0]
                )));
            }
            let b: Vec<f32> = b.iter().map(|v| (*v as f64 / scale) as f32).collect();
            let adapter = Adapter {
                a: Tensor::from_data(TensorData::new(a.clone(), [rank, e.kind.fan_in()]), device),
                b: Tensor::from_data(TensorData::new(b, [e.kind.fan_out(), rank]), device),
                scale,
            };
            match e.adapters.first_mut() {
                Some(first) => *first = adapter,
                None => e.adapters.push(adapter),
            }
            matched += 1;
        }
        if matched != file.modules.len() {
            let known: BTreeSet<String> = entries.iter().map(|e| entry_id(&e.key)).collect();
            let missing: Vec<&String> = file
                .modules
                .iter()
                .filter(|(id, _)| !known.contains(*id))
                .map(|(_, m)| &m.key)
                .collect();
            return Err(unmatched(&file.name, &missing));
        }
        Ok(())
    }

    /// Adds `file` at `scale` (on top of the file's own folded scale) as one more adapter of
    /// every layer it names: inference-time scaling and mixing.
    pub fn add_file(&self, file: &LoraFile, scale: f64, device: &Device) -> Result<()> {
        let mut inner = self.lock();
        let entries = inner.entries_mut();
        let index: BTreeMap<String, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (entry_id(&e.key), i))
            .collect();
        let missing: Vec<&String> = file
            .modules
            .iter()
            .filter(|(id, _)| !index.contains_key(*id))
            .map(|(_, m)| &m.key)
            .collect();
        if !missing.is_empty() {
            return Err(unmatched(&file.name, &missing));
        }
        for (id, m) in &file.modules {
            let LoraModule {
                a,
                a_shape,
                b,
                b_shape,
                ..
            } = m;
            let e = &mut entries[index[id]];
            let rank = a_shape[0];
            check_shapes(&file.name, e, rank, a_shape, b_shape)?;
            e.adapters.push(Adapter {
                a: Tensor::from_data(TensorData::new(a.clone(), [rank, e.kind.fan_in()]), device),
                b: Tensor::from_data(TensorData::new(b.clone(), [e.kind.fan_out(), rank]), device),
                scale,
            });
        }
        Ok(())
    }

    /// Sets the scale of every layer's trainable (first) adapter for good (`alpha / rank` in
    /// training; [`scoped_trainable_scale`](Self::scoped_trainable_scale) for a while).
    pub fn set_trainable_scale(&self, scale: f64) {
        for e in self.lock().entries_mut().iter_mut() {
            if let Some(ad) = e.adapters.first_mut() {
                ad.scale = scale;
            }
        }
    }

    /// The scale of every layer's trainable adapter set to `scale` until the returned scope is
    /// dropped (the base-to-trained slider's evaluation).
    pub fn scoped_trainable_scale(&self, scale: f64) -> LoraScope<'_> {
        let token = self.lock().begin_scope(Change::Scale(scale));
        LoraScope { table: self, token }
    }

    /// The trainable parameters `[A₀, B₀, A₁, B₁, …]` (first adapter of every layer), as the
    /// layers see them.
    pub fn params(&self) -> Vec<Tensor<2>> {
        let inner = self.lock();
        (0..inner.entries.len())
            .filter_map(|i| inner.adapters(i).into_iter().next())
            .flat_map(|ad| [ad.a, ad.b])
            .collect()
    }

    /// `params` ([`params`](Self::params) order) by entry index; panics on a list of another
    /// length (the caller's bug: lists come from [`params`](Self::params) or
    /// [`param_names`](Self::param_names)).
    fn by_entry(
        entries: &[LoraEntry],
        params: &[Tensor<2>],
    ) -> Vec<Option<(Tensor<2>, Tensor<2>)>> {
        let mut it = params.iter().cloned();
        let out = entries
            .iter()
            .map(|e| {
                e.adapters.first().map(|_| {
                    let a = it.next().expect("one A per adapter");
                    (a, it.next().expect("one B per adapter"))
                })
            })
            .collect();
        assert!(it.next().is_none(), "more LoRA parameters than adapters");
        out
    }

    /// Replaces the trainable parameters for good (same order as [`params`](Self::params)):
    /// an optimiser step, a checkpoint restored. For a pass with other parameters, see
    /// [`scoped_params`](Self::scoped_params).
    pub fn set_params(&self, params: &[Tensor<2>]) {
        let mut inner = self.lock();
        let by_entry = Self::by_entry(&inner.entries, params);
        for (e, p) in inner.entries_mut().iter_mut().zip(by_entry) {
            if let (Some(ad), Some((a, b))) = (e.adapters.first_mut(), p) {
                (ad.a, ad.b) = (a, b);
            }
        }
    }

    /// The trainable parameters replaced by `params` (same order as [`params`](Self::params);
    /// autodiff leaves for a pass with gradient) until the returned scope is dropped.
    pub fn scoped_params(&self, params: &[Tensor<2>]) -> LoraScope<'_> {
        let mut inner = self.lock();
        // The folded weights are not used in a pass with gradient; the next pass without one
        // folds again (one small product per layer), so the backward has their memory.
        inner.entries.iter_mut().for_each(|e| e.merged.clear());
        let change = Change::Params(Self::by_entry(&inner.entries, params));
        let token = inner.begin_scope(change);
        LoraScope { table: self, token }
    }

    /// Parameter names in [`params`](Self::params) order: `<key>.lora_A.weight`, ….
    pub fn param_names(&self) -> Vec<String> {
        self.lock()
            .entries
            .iter()
            .filter(|e| !e.adapters.is_empty())
            .flat_map(|e| {
                [
                    format!("{}.lora_A.weight", e.key),
                    format!("{}.lora_B.weight", e.key),
                ]
            })
            .collect()
    }

    /// The trainable (first) adapter of every layer on the host, the scale folded into `B`:
    /// what both LoRA files hold.
    async fn folded(&self) -> Result<Vec<LoraModule>> {
        let mut out = Vec::new();
        for e in &self.entries() {
            let Some(ad) = e.adapters.first() else {
                continue;
            };
            let rank = ad.a.dims()[0];
            out.push(LoraModule {
                key: e.key.clone(),
                a: crate::read_f32(ad.a.clone()).await?.0,
                a_shape: e.kind.a_shape(rank),
                b: crate::read_f32(ad.b.clone() * ad.scale).await?.0,
                b_shape: e.kind.b_shape(rank),
            });
        }
        Ok(out)
    }

    /// The trainable adapters as a diffusers LoRA file (`pytorch_lora_weights.safetensors`):
    /// `A` as is, `B` times the scale (the format carries no alpha), f32.
    pub async fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for m in self.folded().await? {
            tensors.push((format!("{}.lora_A.weight", m.key), m.a_shape, m.a));
            tensors.push((format!("{}.lora_B.weight", m.key), m.b_shape, m.b));
        }
        crate::model::weights::serialize_f32(&tensors, None)
    }

    /// The trainable adapters as a kohya LoRA file (`lora_kohya.safetensors`, for A1111 and
    /// ComfyUI): `lora_down` = `A`, `lora_up` = `B` times the scale and `alpha` = r, so the
    /// strength at weight 1 is ours — the scale is folded, as in the diffusers file and as
    /// diffusers' `convert_state_dict_to_kohya` writes alpha. f32.
    pub async fn to_kohya_safetensors(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for m in self.folded().await? {
            let (component, path) = m.key.split_once('.').unwrap_or(("", &m.key));
            let name = kohya::module_name(component, path).ok_or_else(|| {
                Error::Input(format!("`{}`: no kohya name for this layer", m.key))
            })?;
            let rank = m.a_shape[0];
            tensors.push((format!("{name}.lora_down.weight"), m.a_shape, m.a));
            tensors.push((format!("{name}.lora_up.weight"), m.b_shape, m.b));
            tensors.push((format!("{name}.alpha"), vec![], vec![rank as f32]));
        }
        crate::model::weights::serialize_f32(&tensors, None)
    }
}

fn check_shapes(
    name: &str,
    e: &LoraEntry,
    rank: usize,
    a_shape: &[usize],
    b_shape: &[usize],
) -> Result<()> {
    if a_shape != e.kind.a_shape(rank).as_slice() || b_shape != e.kind.b_shape(rank).as_slice() {
        let b2: Vec<usize> = e.kind.b_shape(rank);
        // A conv layer's B may also come flat, [out, r], from tools that drop the 1×1 axes.
        let flat_b_ok = matches!(e.kind, LoraKind::Conv { .. })
            && b_shape == [b2[0], b2[1]]
            && a_shape == e.kind.a_shape(rank).as_slice();
        if !flat_b_ok {
            return Err(Error::Input(format!(
                "{name}: `{}` has lora_A {a_shape:?} / lora_B {b_shape:?}; the layer needs {:?} / {:?}",
                e.key,
                e.kind.a_shape(rank),
                e.kind.b_shape(rank)
            )));
        }
    }
    Ok(())
}

fn unmatched(name: &str, missing: &[&String]) -> Error {
    let shown: Vec<&str> = missing.iter().take(3).map(|s| s.as_str()).collect();
    Error::Input(format!(
        "{name}: {} LoRA module(s) match no layer of the model, e.g. `{}`",
        missing.len(),
        shown.join("`, `")
    ))
}

/// A seeded uniform [0, 1) stream (f64).
fn rand_uniform(seed: u64) -> impl FnMut() -> f64 {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    move || rng.random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::{Conv2d, Linear, param};
    use crate::noise::NoiseRng;

    /// Random values for every trainable parameter, from `seed`.
    fn randomise(table: &LoraTable, seed: u64, device: &Device) {
        let params: Vec<Tensor<2>> = table
            .params()
            .iter()
            .enumerate()
            .map(|(i, p)| NoiseRng::new(seed + i as u64).randn(p.dims(), device) * 0.3)
            .collect();
        table.set_params(&params);
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let b = b.inner();
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// A `Linear` and a `Conv2d` layer adapted through `table` (attn and conv targets).
    fn layers(table: &LoraTable, device: &Device) -> (Linear, Conv2d) {
        let plan = LoraPlan::targets(table, "unet", &[LoraTarget::Attn, LoraTarget::Conv]);
        let (d_in, d_out) = (6, 5);
        let linear = Linear {
            weight: param(NoiseRng::new(1).randn([d_out, d_in], device).transpose()),
            bias: Some(param(NoiseRng::new(2).randn([d_out], device))),
            lora: plan.slot(
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                LoraKind::Linear { d_in, d_out },
            ),
        };
        let (c_in, c_out) = (3, 4);
        let conv = Conv2d {
            weight: param(NoiseRng::new(3).randn([c_out, c_in, 3, 3], device)),
            bias: Some(param(NoiseRng::new(4).randn([c_out], device))),
            stride: 1,
            pad_begin: 1,
            pad_end: 1,
            lora: plan.slot(
                "mid_block.resnets.0.conv1",
                LoraKind::Conv {
                    c_in,
                    c_out,
                    kernel: 3,
                    stride: 1,
                    pad: (1, 1),
                },
            ),
        };
        assert!(linear.lora.is_some() && conv.lora.is_some());
        (linear, conv)
    }

    fn folded_copies(table: &LoraTable) -> usize {
        table.lock().entries.iter().map(|e| e.merged.len()).sum()
    }

    /// f16 weights fold, into an f16 copy, only for a pass in f16 (a copy is never larger
    /// than the weight): the same as the adapters run apart on the f16 weights within f16's
    /// rounding; a pass in f32 runs them apart; no copy survives a scope with autodiff leaves.
    #[test]
    fn f16_weights_fold_and_gradient_scopes_drop_the_copies() {
        let device = Device::flex();
        let table = LoraTable::new();
        let (mut linear, mut conv) = layers(&table, &device);
        let f16 = burn::tensor::FloatDType::F16;
        linear.weight = param(linear.weight.val().cast(f16));
        conv.weight = param(conv.weight.val().cast(f16));
        table.init_trainable(2, 4.0, 7, &device);
        randomise(&table, 30, &device);
        let x = NoiseRng::new(5).randn([2, 7, 6], &device);
        let image = NoiseRng::new(6).randn([2, 3, 5, 6], &device);
        // In f32 over f16 weights: apart, no copy.
        let _ = linear.forward(x.clone());
        let _ = conv.forward(image.clone());
        assert_eq!(
            folded_copies(&table),
            0,
            "an f32 pass does not fold f16 weights"
        );
        let folded = linear.forward(x.clone().cast(f16));
        let folded_conv = conv.forward(image.clone().cast(f16));
        assert_eq!(folded_copies(&table), 2, "both layers folded");
        assert!(
            table.lock().entries.iter().all(|e| e
                .merged
                .iter()
                .all(|(_, m)| m.dtype() == burn::tensor::DType::F16)),
            "the copies are f16"
        );
        let leaves: Vec<_> = table
            .params()
            .into_iter()
            .map(|p| p.autodiff().require_grad())
            .collect();
        let scope = table.scoped_params(&leaves);
        assert_eq!(
            folded_copies(&table),
            0,
            "a pass with gradient keeps no folded copy"
        );
        let apart = linear.forward(x.clone().cast(f16).autodiff());
        let apart_conv = conv.forward(image.clone().cast(f16).autodiff());
        drop(scope);
        assert_eq!(folded_copies(&table), 0);
        // f16's rounding of W + s·B·A against the adapters summed into an f16 output.
        let d = max_diff(
            folded.cast(burn::tensor::FloatDType::F32),
            apart.cast(burn::tensor::FloatDType::F32),
        );
        assert!(d < 2e-2, "linear: {d}");
        let d = max_diff(
            folded_conv.cast(burn::tensor::FloatDType::F32),
            apart_conv.cast(burn::tensor::FloatDType::F32),
        );
        assert!(d < 2e-2, "conv: {d}");
    }

    /// Without gradient the adapters run folded into the weight; with gradient, apart. The
    /// two agree, and keep agreeing after the adapters and their scale change (a folded
    /// weight kept past a change of the table would not).
    #[test]
    fn folded_adapters_follow_the_table() {
        let device = Device::flex();
        let table = LoraTable::new();
        let (linear, conv) = layers(&table, &device);
        table.init_trainable(2, 4.0, 7, &device);
        let x = NoiseRng::new(5).randn([2, 7, 6], &device);
        let image = NoiseRng::new(6).randn([2, 3, 5, 6], &device);
        let tracked = |t: &Tensor<3>| t.clone().autodiff().require_grad();
        let tracked4 = |t: &Tensor<4>| t.clone().autodiff().require_grad();
        for seed in [10, 20] {
            randomise(&table, seed, &device);
            for scale in [2.0, 0.5] {
                table.set_trainable_scale(scale);
                let folded = linear.forward(x.clone());
                let apart = linear.forward(tracked(&x));
                let d = max_diff(folded.clone(), apart);
                assert!(d < 1e-5, "linear, seed {seed}, scale {scale}: {d}");
                let folded_conv = conv.forward(image.clone());
                let apart_conv = conv.forward(tracked4(&image));
                let d = max_diff(folded_conv, apart_conv);
                assert!(d < 1e-5, "conv, seed {seed}, scale {scale}: {d}");
                // The adapters matter at this size.
                let bias = linear.bias.as_ref().expect("a bias").val().unsqueeze::<3>();
                let base = crate::ops::stored_weight::matmul_stored(x.clone(), linear.weight.val());
                assert!(max_diff(folded, base + bias) > 1e-2);
            }
        }
    }

    fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
        let t = t.inner();
        t.into_data()
            .try_to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    fn param_bits(table: &LoraTable) -> Vec<Vec<u32>> {
        table.params().into_iter().map(bits).collect()
    }

    fn scales(table: &LoraTable) -> Vec<f64> {
        table
            .entries()
            .iter()
            .map(|e| e.adapters[0].scale)
            .collect()
    }

    /// The states of the table each layer holds a folded weight for.
    fn merged_keys(table: &LoraTable) -> Vec<Vec<StateKey>> {
        let inner = table.lock();
        inner
            .entries
            .iter()
            .map(|e| e.merged.iter().map(|(k, _)| k.clone()).collect())
            .collect()
    }

    /// A scope takes its change back however it ends — a panic inside it, a future dropped at
    /// an await, scopes ended out of order — and only its own change. The weights folded for
    /// the permanent adapters outlive a scoped scale (not rebuilt after it) and are dropped
    /// when a scope of parameters begins (its pass with gradient gets their memory); those
    /// folded inside a scope go with it, and a permanent change drops every folded weight:
    /// none is ever stale.
    #[test]
    fn scopes_take_their_change_back() {
        let device = Device::flex();
        let table = LoraTable::new();
        let (linear, conv) = layers(&table, &device);
        table.init_trainable(2, 4.0, 7, &device);
        randomise(&table, 10, &device);
        let x = NoiseRng::new(5).randn([2, 7, 6], &device);
        let image = NoiseRng::new(6).randn([2, 3, 5, 6], &device);
        let tracked = |t: &Tensor<3>| t.clone().autodiff().require_grad();
        // Folded (cached per state) and apart (from the adapters in force) agree.
        let check = |what: &str| {
            let folded = linear.forward(x.clone());
            let d = max_diff(folded.clone(), linear.forward(tracked(&x)));
            assert!(d < 1e-5, "{what}: linear {d}");
            let image_tracked = image.clone().autodiff().require_grad();
            let d = max_diff(conv.forward(image.clone()), conv.forward(image_tracked));
            assert!(d < 1e-5, "{what}: conv {d}");
            folded
        };

        let params = param_bits(&table);
        let scale = scales(&table);
        let plain = bits(check("before"));
        let permanent = table.lock().key();
        assert_eq!(merged_keys(&table), vec![vec![permanent.clone()]; 2]);
        let others: Vec<Tensor<2>> = table
            .params()
            .iter()
            .enumerate()
            .map(|(i, p)| NoiseRng::new(40 + i as u64).randn(p.dims(), &device) * 0.3)
            .collect();
        let leaves: Vec<Tensor<2>> = others
            .iter()
            .map(|p| p.clone().autodiff().require_grad())
            .collect();
        let unchanged = |what: &str, kept: bool| {
            assert_eq!(param_bits(&table), params, "{what}: parameters");
            assert_eq!(scales(&table), scale, "{what}: scale");
            assert!(table.lock().scopes.is_empty(), "{what}: scopes left");
            // The weights folded for the permanent adapters are still there (or were dropped
            // by a scope of parameters), and right once folded again.
            assert_eq!(table.lock().key(), permanent);
            let folded = vec![vec![permanent.clone()]; 2];
            let expected = if kept {
                folded.clone()
            } else {
                vec![vec![]; 2]
            };
            assert_eq!(merged_keys(&table), expected, "{what}");
            assert_eq!(bits(check(what)), plain, "{what}: output");
            assert_eq!(merged_keys(&table), folded, "{what}");
        };

        // A panic inside a scope (leaves in, as for a recorded step; plain, folded, too).
        for params in [&leaves, &others] {
            let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _scope = table.scoped_params(params);
                assert_ne!(bits(check("scoped")), plain);
                panic!("half-way through a step");
            }));
            assert!(failed.is_err());
            unchanged("after a panic in scoped_params", false);
        }
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _scope = table.scoped_trainable_scale(0.5);
            assert_eq!(scales(&table), vec![0.5; 2]);
            check("scaled");
            panic!("half-way through an evaluation");
        }));
        assert!(failed.is_err());
        unchanged("after a panic in scoped_trainable_scale", true);

        // A future dropped while it waits, holding a scope.
        let mut evaluation = Box::pin(async {
            let _scope = table.scoped_trainable_scale(3.0);
            std::future::pending::<()>().await;
        });
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(evaluation.as_mut().poll(&mut cx).is_pending());
        assert_eq!(scales(&table), vec![3.0; 2]);
        check("while the future waits");
        drop(evaluation);
        unchanged("after a dropped future", true);

        // Scopes ended out of order: each takes back its own change only.
        let scaled = table.scoped_trainable_scale(0.5);
        let swapped = table.scoped_params(&others);
        let both = bits(check("both scopes"));
        drop(scaled);
        assert_eq!(scales(&table), scale);
        let others_bits: Vec<Vec<u32>> = others.iter().cloned().map(bits).collect();
        assert_eq!(param_bits(&table), others_bits);
        assert_ne!(bits(check("the params scope alone")), both);
        drop(swapped);
        unchanged("after scopes ended out of order", false);

        // A permanent change inside a scope lies under it, and drops every folded weight.
        let swapped = table.scoped_params(&others);
        check("scoped");
        table.set_params(&leaves.iter().map(|l| l.clone().inner()).collect::<Vec<_>>());
        assert_eq!(param_bits(&table), others_bits);
        check("scoped over a new permanent state");
        drop(swapped);
        assert_eq!(
            param_bits(&table),
            others_bits,
            "set for good under the scope"
        );
        assert!(merged_keys(&table).iter().all(|m| m.is_empty()));
        check("after");
        assert_eq!(merged_keys(&table), vec![vec![table.lock().key()]; 2]);
    }
}
