//! Gives the `shoal` binary an rpath to libtorch's lib directory, so it runs without
//! `LD_LIBRARY_PATH`. torch-sys (`links = "tch"`) exports that directory to us as
//! `DEP_TCH_LIBTORCH_LIB`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // libtorch_cpu pulls its CUDA siblings (nvidia/*/lib) through its own RUNPATH;
        // --disable-new-dtags keeps our rpath applying to those transitive loads too.
        println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
        // Where `device::load_cuda_backend` looks is the rpath; its test checks the file.
        println!("cargo:rustc-env=SHOAL_LIBTORCH_LIB={lib}");
        // NCCL from torch's CUDA wheels (nvidia/nccl/lib beside torch/), where
        // `scripts/setup` gives it the unversioned name cudarc loads; a system NCCL is found
        // on the usual library path either way.
        let nccl = std::path::Path::new(&lib).join("../../nvidia/nccl/lib");
        if nccl.exists() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
        }
    }
}
