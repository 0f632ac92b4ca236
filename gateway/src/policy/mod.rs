//! Who may do what: request authentication (JWT), external authorizers
//! (CUSTOM) and Istio AuthorizationPolicy evaluation, per workload identity.

pub mod authz;
pub mod ext_authz;
pub mod jwks;
pub mod jwt;
pub mod mesh_source;
