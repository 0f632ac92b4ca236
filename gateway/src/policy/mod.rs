//! Who may do what: request authentication (JWT), external authorizers
//! (CUSTOM) and Istio AuthorizationPolicy evaluation, per workload identity;
//! then how many tokens it may spend (token budgets).

pub mod authz;
pub mod budget;
pub mod ext_authz;
pub mod index;
pub mod jwks;
pub mod jwt;
pub mod mesh_source;
