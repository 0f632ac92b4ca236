//! Support for the end-to-end tests: network namespaces, cgroups, a private
//! bpffs, processes started inside them, and the topologies the tests use.
//! Everything a test creates is removed when its handle drops.

pub mod cgroup;
pub mod env;
pub mod gateway_lab;
pub mod kube_lab;
pub mod mesh_lab;
pub mod netns;
pub mod node_lab;
pub mod process;
pub mod topology;
