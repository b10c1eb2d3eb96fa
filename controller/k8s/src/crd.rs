//! Our custom resources: palisade.io/v1 NetworkPolicy, ClusterwideNetworkPolicy and
//! PalisadeIdentity.
