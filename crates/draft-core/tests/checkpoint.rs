//! The checkpointed decode (`Pipeline::decode_chain`: forward without a graph, then one VAE
//! resnet recomputed and back-propagated at a time) against the decoder differentiated as one
//! graph: the same images and the same gradient with respect to the latents, on every device.

mod common;

use common::{devices, fixtures, read_model, rel_err, values};
use draft_core::Pipeline;
use draft_core::noise::NoiseRng;

#[test]
fn the_checkpointed_decode_has_the_whole_graphs_gradient() {
    let model = read_model(&fixtures().join("sd1-tiny"));
    for (name, device) in devices() {
        let pipe = Pipeline::load(&model, &device).unwrap();
        let [c, h, w] = pipe.latent_shape(32, 32).unwrap();
        let z = NoiseRng::new(7).randn([2, c, h, w], &device) * 2.0;
        let chain = pipe.decode_chain();
        assert!(
            chain.segments.len() > 4,
            "{} segments",
            chain.segments.len()
        );

        // The whole decoder as one graph.
        let zg = z.clone().autodiff().require_grad();
        let images = pipe.decode(zg.clone());
        let g_img = NoiseRng::new(8).randn(images.dims(), &device);
        let grads = (images.clone() * g_img.clone().autodiff()).sum().backward();
        let want = values(zg.grad(&grads).unwrap());
        let want_images = values(images.without_autodiff());

        // Checkpointed.
        let (got_images, kept) = chain.forward(z);
        let got = values(chain.vjp(kept, g_img, |_| {}).unwrap());
        let got_images = values(got_images);

        assert_eq!(got_images.1, want_images.1);
        let image_err = rel_err(&got_images.0, &want_images.0);
        let grad_err = rel_err(&got.0, &want.0);
        eprintln!("{name}: images {image_err:.1e}, ∂/∂z {grad_err:.1e} (relative)");
        assert!(image_err <= 1e-6, "{name}: images differ by {image_err:e}");
        assert!(grad_err <= 1e-5, "{name}: gradients differ by {grad_err:e}");
        assert!(
            want.0.iter().any(|v| *v != 0.0),
            "{name}: a zero gradient proves nothing"
        );
    }
}

/// The decoder on strips of rows (`Pipeline::max_buffer_bytes` below its activations, so that
/// its layers run as `draft_core::memory::strips` does it at 512²) against the whole tensors: the same
/// images and the same gradient with respect to the latents, checkpointed and as one graph.
#[test]
fn the_decoder_on_strips_of_rows_matches_the_whole_tensors() {
    let model = read_model(&fixtures().join("sd1-tiny"));
    for (name, device) in devices() {
        let mut pipe = Pipeline::load(&model, &device).unwrap();
        let [c, h, w] = pipe.latent_shape(32, 32).unwrap();
        let z = NoiseRng::new(11).randn([2, c, h, w], &device) * 2.0;

        pipe.max_buffer_bytes = u64::MAX;
        let chain = pipe.decode_chain();
        let (want_images, kept) = chain.forward(z.clone());
        assert_eq!(kept.output_strips(), 1);
        let g_img = NoiseRng::new(12).randn(want_images.dims(), &device);
        let want = values(chain.vjp(kept, g_img.clone(), |_| {}).unwrap());
        drop(chain);
        let want_images = values(want_images);
        assert!(want.0.iter().any(|v| *v != 0.0), "{name}: zero gradient");

        // 100 kB: 2 strips of 8 rows at 16×16 (the first up block's resnets), cut into 16 of
        // one row for the upsampler; 1 byte: strips of one row everywhere but the mid block.
        for (budget, strips) in [(100_000, 16), (1, 32)] {
            pipe.max_buffer_bytes = budget;
            let chain = pipe.decode_chain();
            let (images, kept) = chain.forward(z.clone());
            assert_eq!(kept.output_strips(), strips, "{name}, {budget} B");
            let got = values(chain.vjp(kept, g_img.clone(), |_| {}).unwrap());
            drop(chain);
            let images = values(images);
            assert_eq!(images.1, want_images.1);
            let image_err = rel_err(&images.0, &want_images.0);
            let grad_err = rel_err(&got.0, &want.0);

            // One graph through the strips.
            let zg = z.clone().autodiff().require_grad();
            let out = pipe.decode(zg.clone());
            let grads = (out * g_img.clone().autodiff()).sum().backward();
            let graph_err = rel_err(&values(zg.grad(&grads).unwrap()).0, &want.0);
            eprintln!(
                "{name}, {budget} B: images {image_err:.1e}, ∂/∂z {grad_err:.1e} checkpointed, \
                 {graph_err:.1e} one graph (relative)"
            );
            assert!(image_err <= 2e-6, "{name}: images differ by {image_err:e}");
            assert!(grad_err <= 2e-6, "{name}: gradients differ by {grad_err:e}");
            assert!(
                graph_err <= 2e-6,
                "{name}: gradients differ by {graph_err:e}"
            );
        }
    }
}
