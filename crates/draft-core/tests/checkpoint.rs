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
