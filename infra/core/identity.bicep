// User-assigned managed identity of the Function App.
//
// One identity does everything the app needs without a stored key: host storage (blob, queue),
// our tables and events queue, Key Vault references, Application Insights ingestion, and (when
// marketplaceCredentialType = 'federated') the client assertion that the marketplace app
// registration trusts. A *user-assigned* identity exists before the app does, so role
// assignments are in place before the first start, and its ids are stable across re-creation
// of the app.

@description('Name of the user-assigned managed identity.')
param name string

@description('Azure region.')
param location string

@description('Tags applied to the identity.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
