//! Generates prost messages and tonic stubs from `proto/` with the pure-Rust protox compiler,
//! so no `protoc` binary is needed on a build machine or in a container image.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("../../proto");
    let protos = [
        "optout/queue/v1/messages.proto",
        "optout/evaluator/v1/evaluator.proto",
        "optout/admin/v1/admin.proto",
        "optout/writer/v1/writer.proto",
        "optout/memberships/v1/memberships.proto",
    ];
    // compile_fds() emits no rerun-if-changed lines of its own.
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto_dir.join(proto).display());
    }
    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(protos)?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // Server reflection needs the encoded descriptor set; compile_fds does not write it.
    fs::write(
        out_dir.join("optout_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // Type names let publishers stamp each AMQP message with its full protobuf name (`prost::Name`).
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(compiler.file_descriptor_set(), config)?;
    Ok(())
}
