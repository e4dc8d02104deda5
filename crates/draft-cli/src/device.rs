//! `--device auto|wgpu|vulkan|metal|dx12|cpu` → a Burn device, named on stderr.

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::wgpu::{WgpuBackend, wgpu};
use clap::ValueEnum;
use draft_core::model::pipeline::LoraSetup;
use draft_core::{ModelFiles, Pipeline};

#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    /// A GPU adapter through wgpu if there is one, else the CPU backend.
    Auto,
    /// wgpu on whichever graphics API it picks (software adapters included).
    Wgpu,
    Vulkan,
    Metal,
    Dx12,
    /// Burn's pure-Rust CPU backend (flex).
    Cpu,
}

/// On a machine with no Wayland session, points `XDG_RUNTIME_DIR` (when unset) at a folder that
/// does not exist. Mesa's Vulkan drivers (lavapipe included) probe for a Wayland display when
/// wgpu enables `VK_KHR_wayland_surface`, and libwayland prints "XDG_RUNTIME_DIR is invalid or
/// not set in the environment." on stderr for every probe when the variable is unset; with it
/// set, the probe finds no compositor and says nothing — the truth on a headless machine. Call
/// before any thread starts.
pub fn quiet_headless_wayland() {
    let unset = |k: &str| std::env::var_os(k).is_none_or(|v| v.is_empty());
    if unset("XDG_RUNTIME_DIR") && unset("WAYLAND_DISPLAY") {
        // SAFETY: called first thing in `main`, while the process has one thread.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", "/nonexistent/draft-headless") };
    }
}

/// Starts the CPU backend's thread pool — `--threads N` threads when given, else rayon's own
/// default (`RAYON_NUM_THREADS`, else one per logical core) — and runs `command` on one of its
/// threads. Flex's kernels then split their work from a pool thread (rayon's `join`): the
/// thread that asks keeps working and at most the other threads wake up, where from outside
/// the pool every kernel would hand its work over and put the asking thread to sleep until it
/// is done (two context switches per kernel, a tenth of a small model's step,
/// docs/benchmarks.md). Call before any tensor work.
pub fn in_cpu_pool<T: Send>(
    threads: Option<usize>,
    command: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    if threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        // The main thread's stack size: `command` is what `main` would have run.
        .stack_size(POOL_STACK_BYTES)
        .build_global()
        .context("cannot start the CPU backend's thread pool")?;
    let mut result = None;
    rayon::scope(|_| result = Some(command()));
    result.expect("the pool ran the command")
}

/// Stack of each pool thread (the command runs on one): Linux's default main-thread stack.
const POOL_STACK_BYTES: usize = 8 << 20;

/// `--weights-dtype` and `--sampling-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// f16 on a GPU adapter that computes in f16 (`shader-f16`), f32 on the CPU backend and on
    /// adapters without it.
    Auto,
    F32,
    F16,
}

static DTYPES: std::sync::OnceLock<(DtypeArg, DtypeArg)> = std::sync::OnceLock::new();

/// Sets `--weights-dtype` and `--sampling-dtype` for the process (once, from `main`).
pub fn set_dtypes(weights: DtypeArg, sampling: DtypeArg) {
    let _ = DTYPES.set((weights, sampling));
}

/// Whether `auto` means f16 on `device`: a GPU adapter with f16 arithmetic. The CPU backend
/// can hold f16 but computes it element by element through f32, slower than f32.
fn auto_is_f16(device: &Device) -> bool {
    *device != Device::flex() && device.supports_dtype(FloatDType::F16)
}

fn resolve(arg: DtypeArg, device: &Device) -> FloatDType {
    match arg {
        DtypeArg::F16 => FloatDType::F16,
        DtypeArg::F32 => FloatDType::F32,
        DtypeArg::Auto if auto_is_f16(device) => FloatDType::F16,
        DtypeArg::Auto => FloatDType::F32,
    }
}

/// The dtype the diffusion model's weight matrices and kernels are kept in on `device`.
pub fn weights_dtype(device: &Device) -> FloatDType {
    let (weights, _) = DTYPES
        .get()
        .copied()
        .unwrap_or((DtypeArg::Auto, DtypeArg::Auto));
    resolve(weights, device)
}

/// The dtype the UNet computes in on the steps no gradient goes through
/// ([`Pipeline::sampling_dtype`]).
pub fn sampling_dtype(device: &Device) -> FloatDType {
    let (_, sampling) = DTYPES
        .get()
        .copied()
        .unwrap_or((DtypeArg::Auto, DtypeArg::Auto));
    resolve(sampling, device)
}

/// Loads the pipeline with the process's weights and sampling dtypes, with a line saying
/// which were f16.
pub fn load_pipeline(
    model: &ModelFiles,
    device: &Device,
    lora: &LoraSetup,
) -> draft_core::Result<Pipeline> {
    let weights = weights_dtype(device);
    let sampling = sampling_dtype(device);
    let mut pipeline = Pipeline::load_with(model, device, lora, weights)?;
    if sampling != FloatDType::F32 && !device.supports_dtype(sampling) {
        return Err(draft_core::Error::Input(format!(
            "this device cannot compute in {sampling:?}; use --sampling-dtype f32"
        )));
    }
    pipeline.sampling_dtype = sampling;
    let f16 = |d| d == FloatDType::F16;
    match (f16(weights), f16(sampling)) {
        (false, false) => {}
        (true, false) => eprintln!("draft: weights in f16 (--weights-dtype f32 keeps them in f32)"),
        (false, true) => eprintln!(
            "draft: sampling steps without gradient in f16 (--sampling-dtype f32 keeps them in f32)"
        ),
        (true, true) => eprintln!(
            "draft: weights and the sampling steps without gradient in f16 \
             (--weights-dtype f32 / --sampling-dtype f32 keep them in f32)"
        ),
    }
    Ok(pipeline)
}

/// The number of threads the CPU backend runs on.
pub fn cpu_thread_count() -> usize {
    rayon::current_num_threads()
}

/// Opens the device and prints which adapter is in use.
pub fn select(arg: DeviceArg) -> Result<Device> {
    let (device, name) = match arg {
        DeviceArg::Cpu => (Device::flex(), cpu_name()),
        DeviceArg::Auto => match gpu_adapter() {
            Some(name) => (init_wgpu(WgpuBackend::Auto)?, name),
            None => {
                eprintln!(
                    "draft: no GPU adapter found; falling back to the CPU backend \
                     (software adapters such as lavapipe are used only with --device wgpu)"
                );
                (Device::flex(), cpu_name())
            }
        },
        DeviceArg::Wgpu => wgpu_named(WgpuBackend::Auto)?,
        DeviceArg::Vulkan => wgpu_named(WgpuBackend::Vulkan)?,
        DeviceArg::Metal => wgpu_named(WgpuBackend::Metal)?,
        DeviceArg::Dx12 => wgpu_named(WgpuBackend::Dx12)?,
    };
    eprintln!("draft: device {name}");
    Ok(device)
}

fn cpu_name() -> String {
    let n = cpu_thread_count();
    let threads = if n == 1 {
        "1 thread".to_string()
    } else {
        format!("{n} threads")
    };
    format!("CPU (Burn flex backend, {threads})")
}

fn init_wgpu(api: WgpuBackend) -> Result<Device> {
    Device::wgpu_options()
        .graphics_api(api)
        .init()
        .with_context(|| format!("cannot open a wgpu device on {api:?}"))
}

fn wgpu_named(api: WgpuBackend) -> Result<(Device, String)> {
    let device = init_wgpu(api)?;
    let name = match device.identity() {
        Some(id) => format!("{} (wgpu, {api:?})", id.name),
        None => format!("wgpu ({api:?})"),
    };
    Ok((device, name))
}

/// The name of the first hardware (non-CPU) adapter wgpu can see, if any.
fn gpu_adapter() -> Option<String> {
    // Only the APIs draft runs on (wgpu's GL backend would probe for a display too).
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
    descriptor.backends = wgpu::Backends::PRIMARY;
    let instance = wgpu::Instance::new(descriptor);
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters.into_iter().map(|a| a.get_info()).find_map(|info| {
        matches!(
            info.device_type,
            wgpu::DeviceType::DiscreteGpu
                | wgpu::DeviceType::IntegratedGpu
                | wgpu::DeviceType::VirtualGpu
        )
        .then(|| format!("{} (wgpu, {:?})", info.name, info.backend))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtypes_are_f32_on_the_cpu_backend() {
        // `auto` is the default (nothing set): the CPU backend keeps and computes f32 whatever
        // it can store.
        assert_eq!(weights_dtype(&Device::flex()), FloatDType::F32);
        assert_eq!(sampling_dtype(&Device::flex()), FloatDType::F32);
    }
}
