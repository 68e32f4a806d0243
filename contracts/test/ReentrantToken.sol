// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title ReentrantToken (test only)
/// @notice An ERC-20 that, once armed, calls back into a target contract when that contract
/// sends tokens out, so tests can prove the target's reentrancy guard holds.
/// @dev Never deploy outside tests: anyone can mint and arm it. A failing callback makes the
/// transfer revert with the callback's own revert data.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public callbackData;

    constructor() ERC20("Reentrant", "REENTER") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice On the next transfer out of `target_`, call `target_` with `data` first.
    function arm(address target_, bytes calldata data) external {
        target = target_;
        callbackData = data;
    }

    function _update(address from, address to, uint256 value) internal override {
        if (from != address(0) && from == target) {
            bytes memory data = callbackData;
            // Disarm before calling back so the callback cannot loop.
            delete target;
            delete callbackData;
            (bool ok, bytes memory reason) = from.call(data);
            if (!ok) {
                assembly ("memory-safe") {
                    revert(add(reason, 0x20), mload(reason))
                }
            }
        }
        super._update(from, to, value);
    }
}
