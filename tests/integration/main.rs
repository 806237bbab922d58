//! The one integration-test binary (STYLE.md): one module per area.

mod codec_props;
mod vectors;
