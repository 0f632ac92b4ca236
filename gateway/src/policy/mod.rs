//! Who may do what: request authentication (JWT) and Istio
//! AuthorizationPolicy evaluation, per workload identity.

pub mod authz;
pub mod jwt;
