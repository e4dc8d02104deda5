//! The GPU suite: one command that gives comparable figures on whatever adapter wgpu opens.
//!
//! `cargo bench -p draft-cli --bench gpu -- [--device wgpu|vulkan|metal|dx12|cpu] [--out DIR]
//!  [--skip-tiny] [--skip-512] [--dtypes f32,f16] [--methods k1[,lv2]] [--repeat N] [--timeout-s S]
//!  [--compare DIR] [--memory adaptive|exclusive] [--cleanup] [--autotune minimal|balanced|…]
//!  [--no-dispatch-count] [--unet-call-only]`; `DRAFT_GPU_TRACE=FILE` writes every launch, in
//!  order. `--unet-call-only` ends the 512² cases after the counted UNet call (no step).
//!
//! Every case runs in a child process of its own, so that each one starts cold (its own
//! launch-to-first-step, its own pools, its own peak):
//!
//! - `tiny-sample`: the sd1-tiny fixture (16×16 latents), batch 1 with classifier-free guidance,
//!   10 DDIM steps: seconds from the process's launch to the device opened, to the pipeline
//!   loaded and to the first sampling step finished, then milliseconds per further step.
//! - `tiny-draft1`: a DRaFT-1 step of sd1-tiny (8 sampling steps, colourfulness): the first step
//!   (which pays for kernel compilation and autotuning) and the median of `--repeat` more.
//! - `sd14-512:<dtype>:<method>`: SD-1.4's whole architecture with random weights (the UNet,
//!   the VAE and CLIP ViT-L/14's 12-layer text encoder) at 64×64 latents decoded to 512×512,
//!   batch 1 with guidance, 2 DDIM steps, LoRA r4 on the attention projections, one training
//!   step without the optimizer's: first three UNet calls (guided, batch 2, no gradient; the
//!   third is counted, after compilation and autotune's candidates), then the step. `f16` keeps the weights in f16 and samples the steps without gradient in f16 where
//!   the adapter has `shader-f16`. `--skip-512` leaves these out (`--skip-tiny` the first two).
//!
//! For each case: seconds, dispatches (compute kernels launched, counted from CubeCL's
//! execution log, see below), the device allocator's bytes in use and reserved (CubeCL's pools:
//! what the weights take after loading, the peak polled every 20 ms during the step), and the
//! process's peak resident memory (VmHWM; on a software adapter such as lavapipe the device's
//! buffers are host memory and are in it, on a real GPU they are not). The adapter's name,
//! driver, `shader-f16` and limits head the report. Written as `DIR/gpu-suite.json` and
//! `DIR/gpu-suite.md` (default DIR: `target/gpu-suite`), the table also on stdout. A 512² case
//! reports each phase (load, UNet calls, step) as it completes, so a case that dies in the step
//! keeps what the earlier phases measured, and writes `DIR/timeline-<device>-<dtype>-<method>.csv`:
//! resident memory and the pools' bytes in use and reserved every half second. `--cleanup` hands
//! the pools' empty pages back to the driver between the phases (`Device::memory_cleanup`).
//!
//! Dispatches: the child sets CubeCL's profiling logger to `minimal` ("only the kernels that
//! run are logged without timing") with the `log` crate as its sink, and counts the records: one
//! per kernel launch, whatever fused it, autotune's candidate runs included (which is why the
//! counted UNet call comes after a warm-up call on the same shapes). Counting formats one label
//! per launch on CubeCL's logging task; `--no-dispatch-count` turns it off.
//!
//! Autotune runs at `--autotune` (default `balanced`, what `draft` runs with; the crate's
//! `cubecl.toml` says `minimal` for the tests), and its picks persist across runs (CubeCL's
//! environment store under `target/environment`): a second run of the suite measures start-up
//! with the tuning done and only the kernels' compilation left.
//!
//! Each 512² case writes its LoRA gradient to `DIR/grads-<device>-<dtype>-<method>.safetensors`
//! (the same seeds on every device). `--compare DIR2` ends the report with the relative
//! difference of this run's gradients from those in DIR2 (e.g. a `--device cpu` run): ‖a − b‖ /
//! ‖b‖ over all tensors and the worst tensor's.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use burn::cubecl::config::autotune::AutotuneLevel;
use burn::cubecl::config::profiling::ProfilingConfig;
use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::wgpu::{MemoryConfiguration, WgpuBackend, wgpu};
use draft_core::model::sampler::{Conditioning, sample};
use draft_core::model::schedule::Ddim;
use draft_core::noise::NoiseRng;
use draft_core::reward::builtin::{RewardOptions, WeightedReward};
use draft_core::train::engine::{Engine, Method};
use serde_json::{Value, json};

static LAUNCH: OnceLock<Instant> = OnceLock::new();

fn since_launch() -> f64 {
    LAUNCH.get().expect("set in main").elapsed().as_secs_f64()
}

fn main() {
    LAUNCH.get_or_init(Instant::now);
    // As `draft` does (crates/draft-cli/src/device.rs): no Wayland probe noise on a headless
    // machine. Before any thread starts.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && std::env::var_os("WAYLAND_DISPLAY").is_none()
    {
        // SAFETY: the process has one thread here.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", "/nonexistent/draft-headless") };
    }
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| common::flag(&args, name);
    let has = |name: &str| args.iter().any(|a| a == name);
    let device_arg = flag("--device").unwrap_or_else(|| "wgpu".into());
    if let Some(case) = flag("--case") {
        configure_cubecl(!has("--no-dispatch-count"), flag("--autotune").as_deref());
        let device = open(&device_arg);
        let repeat = flag("--repeat").and_then(|r| r.parse().ok()).unwrap_or(2);
        let out = PathBuf::from(flag("--out").expect("--out"));
        let result = run_case(&case, &device_arg, &device, repeat, &out);
        println!("RESULT {result}");
        return;
    }

    let out = PathBuf::from(flag("--out").unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/gpu-suite")
            .display()
            .to_string()
    }));
    std::fs::create_dir_all(&out).expect("create --out");
    let timeout = Duration::from_secs(
        flag("--timeout-s")
            .and_then(|s| s.parse().ok())
            .unwrap_or(3600),
    );
    let mut cases = Vec::new();
    if !has("--skip-tiny") {
        cases.extend(["tiny-sample".to_string(), "tiny-draft1".to_string()]);
    }
    if !has("--skip-512") {
        let dtypes = flag("--dtypes").unwrap_or_else(|| "f32,f16".into());
        let methods = flag("--methods").unwrap_or_else(|| "k1".into());
        for m in methods.split(',') {
            for d in dtypes.split(',') {
                cases.push(format!("sd14-512:{d}:{m}"));
            }
        }
    }

    let adapter = adapter_report(&device_arg);
    eprintln!("gpu suite on {}", adapter["name"]);
    let mut report = json!({
        "adapter": adapter,
        "device_arg": device_arg,
        "cases": [],
        "gradient_comparison": null,
        "command": args[1..].join(" "),
        "memory": flag("--memory").unwrap_or_else(|| "adaptive".into()),
        "cleanup_between_phases": has("--cleanup"),
        "autotune": flag("--autotune").unwrap_or_else(|| "balanced".into()),
    });
    let mut results = Vec::new();
    for case in &cases {
        eprintln!("{case}…");
        let t0 = Instant::now();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--case", case, "--device", &device_arg])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(r) = flag("--repeat") {
            cmd.args(["--repeat", &r]);
        }
        if has("--no-dispatch-count") {
            cmd.arg("--no-dispatch-count");
        }
        if let Some(level) = flag("--autotune") {
            cmd.args(["--autotune", &level]);
        }
        if let Some(m) = flag("--memory") {
            cmd.env("DRAFT_GPU_MEMORY", m);
        }
        if has("--cleanup") {
            cmd.env("DRAFT_GPU_CLEANUP", "1");
        }
        if has("--unet-call-only") {
            cmd.env("DRAFT_GPU_UNET_CALL_ONLY", "1");
        }
        let mut result = run_child(cmd, timeout).unwrap_or_else(|why| json!({"failed": why}));
        result["case"] = json!(case);
        eprintln!("{case}: {:.0} s", t0.elapsed().as_secs_f64());
        results.push(result);
        // After every case, so that a suite stopped half-way keeps what it measured.
        report["cases"] = json!(results);
        write_report(&out, &report, false);
    }
    report["gradient_comparison"] =
        json!(flag("--compare").map(|other| compare(&out, Path::new(&other), &device_arg)));
    write_report(&out, &report, true);
}

/// `DIR/gpu-suite.json` and `DIR/gpu-suite.md`; the table also on stdout when `last`.
fn write_report(out: &Path, report: &Value, last: bool) {
    let md = markdown(report);
    if last {
        println!("{md}");
    }
    std::fs::write(
        out.join("gpu-suite.json"),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .expect("write gpu-suite.json");
    std::fs::write(out.join("gpu-suite.md"), md).expect("write gpu-suite.md");
    if last {
        eprintln!("wrote {}", out.join("gpu-suite.{json,md}").display());
    }
}

/// Runs one case's child to its `RESULT` line, or says why there is none.
fn run_child(mut cmd: Command, timeout: Duration) -> Result<Value, String> {
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    // The child's progress lines, passed on as they come (a 512² case on a software adapter
    // runs for an hour); the last one says why a case failed.
    let err = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if !line.contains("XDG_RUNTIME_DIR") {
                eprintln!("  {line}");
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    if let Some(line) = out.lines().find_map(|l| l.strip_prefix("RESULT ")) {
        return serde_json::from_str(line).map_err(|e| e.to_string());
    }
    // What the phases that completed measured (`PHASE` lines), kept beside the failure.
    let mut phases = serde_json::Map::new();
    for line in out.lines().filter_map(|l| l.strip_prefix("PHASE ")) {
        if let Ok(Value::Object(fields)) = serde_json::from_str(line) {
            phases.extend(fields);
        }
    }
    // A panic's message is the line after "panicked at" (above the backtrace note that ends
    // stderr).
    let panic = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .skip_while(|l| !l.contains("panicked at"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let why = if panic.is_empty() {
        last.to_string()
    } else {
        panic
    };
    let why = match status {
        None => format!("timed out after {} s", timeout.as_secs()),
        Some(status) => format!("{status}: {why}"),
    };
    if phases.is_empty() {
        return Err(why);
    }
    phases.insert("failed".into(), json!(why));
    Ok(Value::Object(phases))
}

/// Adds `fields` to a case's `result` and prints them as a `PHASE` line, which the suite keeps
/// if the case fails later.
fn phase(result: &mut Value, fields: Value) {
    println!("PHASE {fields}");
    if let (Value::Object(r), Value::Object(f)) = (result, fields) {
        r.extend(f);
    }
}

/// Counts kernel launches: CubeCL's profiling logger at `minimal` logs one record per launch
/// ("Executing …") to the `log` crate, under the target `cubecl::profiling`.
struct DispatchCounter;

static DISPATCHES: AtomicU64 = AtomicU64::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Kernels compiled so far (CubeCL's compilation log, one record per pipeline built).
static COMPILED: AtomicU64 = AtomicU64::new(0);
/// Launches so far by kernel kind (see [`kernel_kind`]).
static KERNELS: std::sync::Mutex<BTreeMap<String, u64>> = std::sync::Mutex::new(BTreeMap::new());

/// A launch's kernel without its generic arguments and launch settings: what it computes
/// (`…::matmul::…`, a fused element-wise kernel, `…::conv…`), to group the dispatch count by.
fn kernel_kind(name: &str) -> &str {
    let end = name.find(['<', '{', '(', ' ']).unwrap_or(name.len());
    &name[..end]
}

/// The launches by kernel kind since `before` (a copy of [`KERNELS`] then), most first.
fn kernels_since(before: &BTreeMap<String, u64>) -> Value {
    let now = KERNELS.lock().unwrap().clone();
    let mut diff: Vec<(String, u64)> = now
        .into_iter()
        .map(|(k, n)| {
            let b = before.get(&k).copied().unwrap_or(0);
            (k, n - b)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    diff.sort_by_key(|d| std::cmp::Reverse(d.1));
    Value::Array(diff.into_iter().map(|(k, n)| json!([k, n])).collect())
}

impl log::Log for DispatchCounter {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        matches!(
            metadata.target(),
            "cubecl::profiling" | "cubecl::compilation"
        )
    }
    fn log(&self, record: &log::Record) {
        if record.target() == "cubecl::compilation" {
            COMPILED.fetch_add(1, Ordering::Relaxed);
        } else if record.target() == "cubecl::profiling" {
            DISPATCHES.fetch_add(1, Ordering::Relaxed);
            let text = record.args().to_string();
            trace_line(&text);
            let name = kernel_kind(text.strip_prefix("Executing ").unwrap_or(&text));
            *KERNELS.lock().unwrap().entry(name.to_string()).or_default() += 1;
        }
    }
    fn flush(&self) {}
}

/// `DRAFT_GPU_TRACE=FILE`: every launch's full record, in order, and the cases' marks
/// ([`trace_line`]), to see which operations fusion left apart.
static TRACE: std::sync::Mutex<Option<std::io::BufWriter<std::fs::File>>> =
    std::sync::Mutex::new(None);

fn trace_line(text: &str) {
    use std::io::Write;
    if let Some(w) = TRACE.lock().unwrap().as_mut() {
        writeln!(w, "{text}").expect("write the trace");
        w.flush().expect("write the trace");
    }
}

/// CubeCL's configuration for a case: the `cubecl.toml` found from the working directory
/// (the crate's, when run by `cargo bench`: minimal autotune, for the tests), with autotune at
/// `level` (default `balanced`, what `draft` runs with) and, with `count`, the dispatch counter.
fn configure_cubecl(count: bool, level: Option<&str>) {
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.autotune.level = match level.unwrap_or("balanced") {
        "minimal" => AutotuneLevel::Minimal,
        "balanced" => AutotuneLevel::Balanced,
        "extensive" => AutotuneLevel::Extensive,
        "full" => AutotuneLevel::Full,
        other => panic!("--autotune {other}: expected minimal, balanced, extensive or full"),
    };
    if count {
        config.profiling =
            toml::from_str::<ProfilingConfig>("[logger]\nlevel = \"minimal\"\nlog = \"info\"")
                .expect("profiling config");
        config.compilation.logger =
            toml::from_str("level = \"basic\"\nlog = \"info\"").expect("compilation logger");
        if let Some(path) = std::env::var_os("DRAFT_GPU_TRACE") {
            let file = std::fs::File::create(path).expect("create DRAFT_GPU_TRACE");
            *TRACE.lock().unwrap() = Some(std::io::BufWriter::new(file));
        }
        log::set_logger(&DispatchCounter).expect("no other logger");
        log::set_max_level(log::LevelFilter::Info);
        COUNTING.store(true, Ordering::Relaxed);
    }
    CubeClRuntimeConfig::set(config);
}

/// The launches between two readings of [`dispatches`] (null when not counting).
fn launches_between(before: Option<u64>, after: Option<u64>) -> Value {
    match (before, after) {
        (Some(a), Some(b)) => json!(b - a),
        _ => Value::Null,
    }
}

/// Launches counted so far, once the device has finished and CubeCL's logging task has
/// caught up (it logs asynchronously: wait until the count stops moving).
fn dispatches(device: &Device) -> Option<u64> {
    device.sync().unwrap();
    if !COUNTING.load(Ordering::Relaxed) {
        return None;
    }
    let mut last = DISPATCHES.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = DISPATCHES.load(Ordering::Relaxed);
        if now == last {
            return Some(now);
        }
        last = now;
    }
}

fn open(arg: &str) -> Device {
    let api = match arg {
        "cpu" => return Device::flex(),
        "wgpu" => WgpuBackend::Auto,
        "vulkan" => WgpuBackend::Vulkan,
        "metal" => WgpuBackend::Metal,
        "dx12" => WgpuBackend::Dx12,
        other => panic!("--device {other}: expected wgpu, vulkan, metal, dx12 or cpu"),
    };
    let mut options = Device::wgpu_options().graphics_api(api);
    // `--memory exclusive`: one device allocation per buffer (CubeCL's `ExclusivePages`) instead
    // of the default `Adaptive` pages that buffers are carved from.
    if std::env::var("DRAFT_GPU_MEMORY").as_deref() == Ok("exclusive") {
        options = options.memory_config(MemoryConfiguration::ExclusivePages);
    }
    options.init().expect("open a wgpu device")
}

/// The adapter wgpu opens for `arg`: name, driver, `shader-f16` and the limits that bound
/// what fits (first adapter of the chosen API, as wgpu's default).
fn adapter_report(arg: &str) -> Value {
    if arg == "cpu" {
        return json!({"name": "CPU (Burn flex backend)", "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)});
    }
    let device = open(arg);
    let name = device.identity().map(|i| i.name).unwrap_or_default();
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
    descriptor.backends = wgpu::Backends::PRIMARY;
    let instance = wgpu::Instance::new(descriptor);
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    let Some(adapter) = adapters
        .iter()
        .find(|a| a.get_info().name == name)
        .or(adapters.first())
    else {
        return json!({"name": name});
    };
    let info = adapter.get_info();
    let limits = adapter.limits();
    json!({
        "name": info.name,
        "backend": format!("{:?}", info.backend),
        "device_type": format!("{:?}", info.device_type),
        "driver": info.driver,
        "driver_info": info.driver_info,
        "shader_f16": adapter.features().contains(wgpu::Features::SHADER_F16),
        "max_buffer_size": limits.max_buffer_size,
        "max_storage_buffer_binding_size": limits.max_storage_buffer_binding_size,
        "max_compute_workgroup_storage_size": limits.max_compute_workgroup_storage_size,
        "max_compute_invocations_per_workgroup": limits.max_compute_invocations_per_workgroup,
        "max_compute_workgroups_per_dimension": limits.max_compute_workgroups_per_dimension,
    })
}

/// What the allocator's pools have reserved at most so far: Σ pages_peak × page size over the
/// pools ([`Device::memory_pool_report`]; an upper bound, as the pools' peaks need not
/// coincide), with each pool. Read once a phase is over: *polling* the allocator during a phase
/// is not an option, since every reading (`memory_pool_usage`) drains the operations Burn's
/// fusion has recorded, which splits its fused kernels where the readings fall — new kernels to
/// compile and more dispatches (a 512² UNet call on lavapipe went from minutes to half an hour
/// under a 20 ms poll).
fn pools_peak(device: &Device) -> Value {
    device.sync().unwrap();
    let Some(pools) = device.memory_pool_report() else {
        return Value::Null;
    };
    let peak: u64 = pools.iter().map(|p| p.pages_peak * p.page_size).sum();
    json!({
        "reserved_peak_mib": mib(peak),
        "pools": pools.iter().map(|p| json!({
            "page_mib": mib(p.page_size),
            "pages": p.pages,
            "pages_peak": p.pages_peak,
            "largest_alloc_mib": mib(p.largest_alloc),
        })).collect::<Vec<_>>(),
    })
}

/// Resets the process's peak resident memory (VmHWM) to what is resident now (Linux), so the
/// next reading of VmHWM is the coming phase's peak.
fn reset_rss_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Writes `t_s,rss_mib,compiled,dispatches,pool_in_use_mib,pool_reserved_mib` every half
/// second to `path` until dropped: the resident memory of every phase (on a software adapter,
/// the device's buffers too) beside the kernels compiled and launched so far, kept on disk even
/// when a case dies half-way. It reads /proc and counters only, not the device (see
/// [`pools_peak`]), except with `DRAFT_GPU_POOL_POLL_S=S`: then another thread reads the
/// pools' bytes in use and reserved every S seconds, and each line has the latest reading. That
/// thread's fusion stream is empty, so a reading drains nothing of the case's; it does wait
/// for the device.
struct Timeline(Arc<AtomicBool>);

impl Timeline {
    fn start(path: PathBuf, device: &Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        // The pools' last reading, `in_use,reserved` (empty until the first), written by a
        // thread of its own: a reading waits for the device, which may be busy for minutes,
        // and the resident memory must be sampled meanwhile.
        let pool = Arc::new(std::sync::Mutex::new(",".to_string()));
        if let Some(every) = std::env::var("DRAFT_GPU_POOL_POLL_S")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map(Duration::from_secs_f64)
        {
            let (s, pool, device) = (stop.clone(), pool.clone(), device.clone());
            std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(m) = device.memory_pool_usage() {
                        *pool.lock().unwrap() =
                            format!("{},{}", mib(m.bytes_in_use), mib(m.bytes_reserved));
                    }
                    std::thread::sleep(every);
                }
            });
        }
        let s = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let Ok(mut file) = std::fs::File::create(&path) else {
                return;
            };
            let _ = writeln!(
                file,
                "t_s,rss_mib,compiled,dispatches,pool_in_use_mib,pool_reserved_mib"
            );
            while !s.load(Ordering::Relaxed) {
                let pool = pool.lock().unwrap().clone();
                let _ = writeln!(
                    file,
                    "{:.1},{},{},{},{pool}",
                    since_launch(),
                    rss_mib("VmRSS"),
                    COMPILED.load(Ordering::Relaxed),
                    DISPATCHES.load(Ordering::Relaxed),
                );
                let _ = file.flush();
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Self(stop)
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `--cleanup`: hands the pools' empty pages back to the driver between phases
/// (`Device::memory_cleanup`), so that each phase's peak is its own.
fn cleanup(device: &Device) -> Value {
    if std::env::var("DRAFT_GPU_CLEANUP").as_deref() == Ok("1") {
        device.sync().unwrap();
        device.memory_cleanup();
    }
    json!({"pool": now_usage(device), "rss_mib": rss_mib("VmRSS")})
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0
}

fn now_usage(device: &Device) -> Value {
    device.sync().unwrap();
    match device.memory_pool_usage() {
        Some(m) => {
            json!({"in_use_mib": mib(m.bytes_in_use), "reserved_mib": mib(m.bytes_reserved), "allocations": m.number_allocs})
        }
        None => Value::Null,
    }
}

fn rss_mib(field: &str) -> f64 {
    mib(common::status_kib(field) << 10)
}

fn run_case(case: &str, device_arg: &str, device: &Device, repeat: usize, out: &Path) -> Value {
    let opened = since_launch();
    let parts: Vec<&str> = case.split(':').collect();
    let mut result = match parts[0] {
        "tiny-sample" => tiny_sample(device),
        "tiny-draft1" => tiny_draft1(device, repeat),
        "sd14-512" => sd14_512(device, device_arg, parts[1], parts[2], repeat, out),
        other => panic!("unknown case {other}"),
    };
    result["case"] = json!(case);
    result["device_opened_s"] = json!(round3(opened));
    result["peak_rss_mib"] = json!(rss_mib("VmHWM"));
    result["kernels_compiled"] = json!(COMPILED.load(Ordering::Relaxed));
    result
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn tiny_sample(device: &Device) -> Value {
    let pipe = common::load_sd1_tiny(device, FloatDType::F32);
    device.sync().unwrap();
    let loaded = since_launch();
    let cond = Conditioning::new(
        pipe.encode_prompts(&["a red circle".into()]).unwrap(),
        pipe.encode_prompts(&[String::new()]).unwrap(),
        7.5,
    );
    let steps = 10;
    let ddim = Ddim::new(&pipe.scheduler, steps).unwrap();
    let size = pipe.unet_config.sample_size;
    let x = NoiseRng::new(0).randn([1, 4, size, size], device);
    let d0 = dispatches(device);
    let mut marks = Vec::new();
    let mut first_dispatches = None;
    let mut first_kernels = BTreeMap::new();
    let x = sample(
        &pipe.unet,
        &ddim,
        0.0,
        x,
        &cond,
        |_| None,
        |i, _| {
            device.sync().unwrap();
            marks.push(since_launch());
            if i == 1 {
                first_dispatches = dispatches(device);
                first_kernels = KERNELS.lock().unwrap().clone();
            }
            if i >= 1 && TRACE.lock().unwrap().is_some() {
                dispatches(device);
                trace_line(&format!("# step {i} done"));
            }
            true
        },
    )
    .unwrap();
    let all = dispatches(device);
    let finite = x.abs().max().into_scalar::<f32>().is_finite();
    assert!(finite, "latents not finite");
    let per_step = (marks[steps - 1] - marks[0]) / (steps - 1) as f64;
    json!({
        "model": "sd1-tiny 16×16, batch 1 + CFG",
        "loaded_s": round3(loaded),
        "first_step_s": round3(marks[0]),
        "step_ms": round3(per_step * 1e3),
        "steps": steps,
        // The first step launches autotune's candidates too; the later ones are the steady count.
        "dispatches_unet_call": match (first_dispatches, all) {
            (Some(f), Some(a)) => json!((a - f) / (steps as u64 - 1)),
            _ => Value::Null,
        },
        "dispatches_first_step": launches_between(d0, first_dispatches),
        // By kernel kind, over the steady steps (per UNet call: divide by steps − 1).
        "kernels_steady_steps": kernels_since(&first_kernels),
    })
}

fn tiny_draft1(device: &Device, repeat: usize) -> Value {
    let mut pipe = common::load_sd1_tiny(device, FloatDType::F32);
    common::init_bench_lora(&mut pipe, device);
    let after_load = now_usage(device);
    let reward =
        WeightedReward::from_specs(&["colorfulness".into()], &RewardOptions::default()).unwrap();
    let steps = 8;
    let engine = Engine::new(&pipe, steps, 0.0, &reward).unwrap();
    let prompts = common::cat_prompts(&pipe);
    let size = pipe.unet_config.sample_size;
    let step = |seed: u64| {
        let (_, norm, secs) = common::timed_step(
            &engine,
            Method::DraftK { k: 1 },
            &prompts,
            (1, size),
            seed,
            device,
        );
        assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
        secs
    };
    let first = step(0);
    let first_done = since_launch();
    let first_pools = pools_peak(device);
    let d0 = dispatches(device);
    // Resident memory and kernels compiled after each step: a climb from step to step with
    // the pools flat is memory held outside them (the driver's, compiled pipelines).
    let mut after_steps = vec![json!([rss_mib("VmRSS"), COMPILED.load(Ordering::Relaxed)])];
    let mut times: Vec<f64> = (1..=repeat.max(1) as u64)
        .map(|seed| {
            let secs = step(seed);
            after_steps.push(json!([rss_mib("VmRSS"), COMPILED.load(Ordering::Relaxed)]));
            secs
        })
        .collect();
    let d1 = dispatches(device);
    times.sort_by(f64::total_cmp);
    json!({
        "model": "sd1-tiny 16×16, batch 1 + CFG, 8 DDIM steps, DRaFT-1",
        "first_step_s": round3(first),
        "launch_to_first_step_done_s": round3(first_done),
        "step_s": round3(times[times.len() / 2]),
        "pool_after_load": after_load,
        "pools_after_first_step": first_pools,
        "pools_after_steps": pools_peak(device),
        "pool_after_step": now_usage(device),
        "rss_mib_and_compiled_after_each_step": after_steps,
        "dispatches_step": match (d0, d1) {
            (Some(a), Some(b)) => json!((b - a) / times.len() as u64),
            _ => Value::Null,
        },
    })
}

fn sd14_512(
    device: &Device,
    device_arg: &str,
    dtype: &str,
    method: &str,
    repeat: usize,
    out: &Path,
) -> Value {
    let weights = match dtype {
        "f32" => FloatDType::F32,
        "f16" => FloatDType::F16,
        other => panic!("dtype {other}: expected f32 or f16"),
    };
    let method = match method {
        "k1" => Method::DraftK { k: 1 },
        "lv2" => Method::DraftLv { n: 2 },
        other => panic!("method {other}: expected k1 or lv2"),
    };
    let _timeline = Timeline::start(
        out.join(format!(
            "timeline-{device_arg}-{dtype}-{}.csv",
            method_name(method)
        )),
        device,
    );
    let mut result = json!({
        "model": "SD-1.4 architecture (random), 64×64 latents → 512², batch 1 + CFG, 2 DDIM steps",
        "weights": dtype,
        "method": method_name(method),
    });
    let mut pipe = common::load_sd1_tiny(device, weights);
    let size = common::make_sd14(&mut pipe, device, weights, true);
    let f16_sampling = weights == FloatDType::F16
        && *device != Device::flex()
        && device.supports_dtype(FloatDType::F16);
    if f16_sampling {
        pipe.sampling_dtype = FloatDType::F16;
    }
    common::init_bench_lora(&mut pipe, device);
    let loaded = since_launch();
    let after_load = now_usage(device);
    let rss_loaded = rss_mib("VmRSS");
    let load_pools = pools_peak(device);
    phase(
        &mut result,
        json!({
            "sampling_dtype": if f16_sampling { "f16" } else { "f32" },
            "loaded_s": round3(loaded),
            "rss_after_load_mib": rss_loaded,
            "pool_after_load": after_load,
            "pools_after_load": load_pools,
            "rss_peak_load_mib": rss_mib("VmHWM"),
            "after_load_cleanup": cleanup(device),
        }),
    );

    // One guided UNet call (batch 2, no gradient) twice: the first compiles and tunes, the
    // second is counted.
    let cond = Conditioning::new(
        pipe.encode_prompts(&["a photo of a cat".into()]).unwrap(),
        pipe.encode_prompts(&[String::new()]).unwrap(),
        7.5,
    );
    let x = NoiseRng::new(5).randn([1, 4, size, size], device);
    let call = || {
        let t0 = Instant::now();
        let y = cond.model_output(&pipe.unet, x.clone(), 500.0);
        device.sync().unwrap();
        drop(y);
        t0.elapsed().as_secs_f64()
    };
    eprintln!("loaded in {loaded:.1} s; resident {rss_loaded} MiB");
    reset_rss_peak();
    let first_call = call();
    eprintln!("first UNet call (compiles and tunes): {first_call:.1} s");
    // Autotune can still be timing candidates in the second call (fused products, whose
    // optimisation is tuned the first time it runs from the fusion cache): the third is counted.
    let d_second = dispatches(device);
    let second_call = call();
    eprintln!("second UNet call: {second_call:.1} s");
    let d0 = dispatches(device);
    let k0 = KERNELS.lock().unwrap().clone();
    let third_call = call();
    eprintln!("third UNet call (counted): {third_call:.1} s");
    let d1 = dispatches(device);
    let call_pools = pools_peak(device);
    phase(
        &mut result,
        json!({
            "unet_call_first_s": round3(first_call),
            "unet_call_second_s": round3(second_call),
            "unet_call_s": round3(third_call),
            "dispatches_unet_call_second": launches_between(d_second, d0),
            "dispatches_unet_call": launches_between(d0, d1),
            "kernels_unet_call": kernels_since(&k0),
            "pools_after_unet_calls": call_pools,
            "rss_peak_unet_calls_mib": rss_mib("VmHWM"),
            "after_calls_cleanup": cleanup(device),
        }),
    );
    if std::env::var_os("DRAFT_GPU_UNET_CALL_ONLY").is_some() {
        return result;
    }

    let reward =
        WeightedReward::from_specs(&["colorfulness".into()], &RewardOptions::default()).unwrap();
    let engine = Engine::new(&pipe, 2, 0.0, &reward).unwrap();
    let prompts = common::cat_prompts(&pipe);
    let step = |seed: u64| {
        let (e, norm, secs) =
            common::timed_step(&engine, method, &prompts, (1, size), seed, device);
        assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
        (secs, e)
    };
    reset_rss_peak();
    let d2 = dispatches(device);
    eprintln!("the step…");
    let (first_step, e) = step(0);
    eprintln!("step: {first_step:.1} s");
    let d3 = dispatches(device);
    let step_pools = pools_peak(device);
    let step_rss = rss_mib("VmHWM");
    let after_step = now_usage(device);
    save_grads(
        &out.join(format!(
            "grads-{device_arg}-{dtype}-{}.safetensors",
            method_name(method)
        )),
        &e.grads,
    );
    drop(e);
    let mut later: Vec<f64> = (1..repeat as u64).map(|s| step(s).0).collect();
    later.sort_by(f64::total_cmp);
    phase(
        &mut result,
        json!({
            "first_step_s": round3(first_step),
            "dispatches_step": launches_between(d2, d3),
            "pools_after_step": step_pools,
            "pool_after_step": after_step,
            "peak_rss_step_mib": step_rss,
        }),
    );
    phase(
        &mut result,
        json!({
            "later_steps_median_s": later.get(later.len() / 2).map(|s| round3(*s)),
        }),
    );
    result
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::DraftLv { .. } => "lv2",
        _ => "k1",
    }
}

fn save_grads(path: &Path, grads: &[Tensor<2>]) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = grads
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let values = g.to_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (format!("{i:04}"), g.dims().to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write gradients");
}

fn read_grads(path: &Path) -> Option<BTreeMap<String, Vec<f32>>> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    Some(
        st.tensors()
            .into_iter()
            .map(|(name, view)| {
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (name, v)
            })
            .collect(),
    )
}

/// ‖a − b‖ / ‖b‖ of every gradient file in `ours` against the file of the same case in
/// `theirs` (whatever device wrote it), over all tensors and for the worst tensor.
fn compare(ours: &Path, theirs: &Path, device_arg: &str) -> Value {
    let mut rows = Vec::new();
    let prefix = format!("grads-{device_arg}-");
    let Ok(entries) = std::fs::read_dir(ours) else {
        return Value::Null;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(tail) = name.strip_prefix(&prefix) else {
            continue;
        };
        let other = std::fs::read_dir(theirs).ok().and_then(|es| {
            es.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().ends_with(&format!("-{tail}")))
            })
        });
        let (Some(a), Some(b)) = (
            read_grads(&entry.path()),
            other.as_deref().and_then(read_grads),
        ) else {
            continue;
        };
        let (mut num, mut den, mut worst) = (0f64, 0f64, 0f64);
        for (k, va) in &a {
            let Some(vb) = b.get(k) else { continue };
            let (mut n, mut d) = (0f64, 0f64);
            for (x, y) in va.iter().zip(vb) {
                n += ((x - y) as f64).powi(2);
                d += (*y as f64).powi(2);
            }
            num += n;
            den += d;
            if d > 0.0 {
                worst = worst.max((n / d).sqrt());
            }
        }
        rows.push(json!({
            "case": tail.trim_end_matches(".safetensors"),
            "against": other.map(|p| p.display().to_string()),
            "relative_global": (num / den).sqrt(),
            "relative_worst_tensor": worst,
        }));
    }
    json!(rows)
}

fn markdown(report: &Value) -> String {
    let a = &report["adapter"];
    let mut md = String::new();
    md += &format!(
        "Adapter: {} ({}, {}; driver {} {}); shader-f16: {}; max buffer {} MiB, max storage binding {} MiB.\n\n",
        a["name"].as_str().unwrap_or("?"),
        a["backend"].as_str().unwrap_or("-"),
        a["device_type"].as_str().unwrap_or("-"),
        a["driver"].as_str().unwrap_or("-"),
        a["driver_info"].as_str().unwrap_or(""),
        a["shader_f16"],
        a["max_buffer_size"].as_u64().map(|b| b >> 20).unwrap_or(0),
        a["max_storage_buffer_binding_size"]
            .as_u64()
            .map(|b| b >> 20)
            .unwrap_or(0),
    );
    md += "| case | first step (s, with compilation and tuning) | steady step | launch → first step done (s) | dispatches (UNet call / step) | pool in use after load / after the step (MiB) | pool reserved peak (MiB) | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|\n";
    let f = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    for c in report["cases"].as_array().into_iter().flatten() {
        if c.get("failed").is_some() && c.get("loaded_s").is_none() {
            md += &format!(
                "| {} | failed: {} | | | | | | |\n",
                f(&c["case"]),
                f(&c["failed"])
            );
            continue;
        }
        let steady = if c.get("step_ms").is_some() {
            format!("{} ms", f(&c["step_ms"]))
        } else if c.get("later_steps_median_s").is_some_and(|v| !v.is_null()) {
            format!("{} s", f(&c["later_steps_median_s"]))
        } else if c.get("step_s").is_some() {
            format!("{} s", f(&c["step_s"]))
        } else {
            "-".into()
        };
        let launch = c
            .get("launch_to_first_step_done_s")
            .or(c.get("first_step_s").filter(|_| c.get("step_ms").is_some()))
            .map(f)
            .unwrap_or("-".into());
        md += &format!(
            "| {}{} | {} | {} | {} | {} / {} | {} / {} | {} | {} |\n",
            f(&c["case"]),
            c.get("sampling_dtype")
                .map(|s| format!(" (sampling {})", f(s)))
                .unwrap_or_default(),
            match c.get("failed") {
                Some(why) => format!("failed: {}", f(why)),
                None => f(&c["first_step_s"]),
            },
            steady,
            launch,
            f(&c["dispatches_unet_call"]),
            f(c.get("dispatches_step")
                .unwrap_or(&c["dispatches_first_step"])),
            f(&c["pool_after_load"]["in_use_mib"]),
            f(&c["pool_after_step"]["in_use_mib"]),
            f(&c.get("pools_after_step").unwrap_or(&c["pools_after_steps"])["reserved_peak_mib"]),
            f(&c["peak_rss_mib"]),
        );
    }
    if let Some(rows) = report["gradient_comparison"].as_array() {
        md += "\n| LoRA gradient | against | ‖a − b‖ / ‖b‖ | worst tensor |\n|---|---|---|---|\n";
        for r in rows {
            md += &format!(
                "| {} | {} | {:.2e} | {:.2e} |\n",
                f(&r["case"]),
                f(&r["against"]),
                r["relative_global"].as_f64().unwrap_or(f64::NAN),
                r["relative_worst_tensor"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    md
}
