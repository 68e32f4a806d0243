// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {Election} from "./Election.sol";

/// @title StakeRegistry
/// @notice Node stakes, website partners, the master candidate set, the per-epoch committee
/// election and slashing, exactly as docs/economics.md describes them.
/// @dev Stake belongs to the address that sends it: a node stakes with its own key. Results and
/// slash orders are EIP-712 messages in this contract's domain ("ravenp2p", "1").
contract StakeRegistry is EIP712, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @notice A committee's order to slash `amount` of `offender`'s stake, for `evidence`.
    struct SlashOrder {
        address offender;
        uint256 amount;
        bytes32 evidence;
        uint256 epoch;
    }

    struct Stake {
        uint256 active;
        uint256 unbonding;
        uint256 releaseTime;
    }

    bytes32 public constant RESULT_TYPEHASH =
        keccak256("Result(bytes32 job,uint64 calculation,bytes32 digest)");
    bytes32 public constant SLASH_ORDER_TYPEHASH =
        keccak256("SlashOrder(address offender,uint256 amount,bytes32 evidence,uint256 epoch)");
    uint256 private constant BPS = 10_000;
    uint256 private constant MAX_CANDIDATES_LIMIT = 256;

    IERC20 public immutable token;
    address public immutable treasury;
    uint256 public immutable minMasterStake;
    uint256 public immutable unbondingDelay;
    uint256 public immutable epochLength;
    uint256 public immutable committeeSize;
    uint256 public immutable maxCandidates;
    uint256 public immutable equivocationSlashBps;
    uint256 public immutable reporterShareBps;
    /// @notice Timestamp of the deployment block: epoch 0 starts here.
    uint256 public immutable genesis;

    mapping(address node => Stake) private _stakes;
    /// @notice The website partner that earns the partner fee on a node's work (zero: none).
    mapping(address node => address partner) public partnerOf;

    address[] private _candidates;
    /// @dev One plus the candidate's index in `_candidates`; zero for non-candidates.
    mapping(address node => uint256 slot) private _candidateSlot;

    mapping(uint256 epoch => bool) private _elected;
    mapping(uint256 epoch => bytes32) private _seeds;
    mapping(uint256 epoch => address[]) private _committees;

    mapping(bytes32 key => bool) private _equivocationSlashed;
    mapping(bytes32 orderDigest => bool) private _orderExecuted;

    event StakeChanged(address indexed node, uint256 active, uint256 unbonding);
    event UnbondRequested(address indexed node, uint256 amount, uint256 releaseTime);
    event Withdrawn(address indexed node, uint256 amount);
    event CandidateAdded(address indexed node);
    event CandidateRemoved(address indexed node);
    event PartnerSet(address indexed node, address indexed partner);
    event CommitteeElected(uint256 indexed epoch, bytes32 seed, address[] committee);
    /// @param evidence For an equivocation `keccak256(abi.encode(worker, job, calculation))`, for
    /// a committee order the order's own `evidence`.
    event Slashed(
        address indexed offender,
        uint256 amount,
        address indexed reporter,
        uint256 reporterReward,
        bytes32 indexed evidence
    );

    error ZeroAddress(string parameter);
    error InvalidParameter(string parameter, uint256 value);
    error ZeroAmount();
    error InsufficientStake(address node, uint256 requested, uint256 active);
    error NothingToWithdraw(address node);
    error StillUnbonding(address node, uint256 releaseTime);
    error AlreadyCandidate(address node);
    error NotCandidate(address node);
    error StakeBelowMinimum(address node, uint256 active, uint256 minimum);
    error CandidateSetFull(uint256 maxCandidates);
    error EpochAlreadyElected(uint256 epoch);
    error NoEligibleCandidates(uint256 epoch);
    error EpochNotElected(uint256 epoch);
    error IdenticalDigests(bytes32 digest);
    error SignatureNotByWorker(address worker, address signer);
    error EquivocationAlreadySlashed(address worker, bytes32 job, uint64 calculation);
    error NothingToSlash(address offender);
    error SlashOrderAlreadyExecuted(bytes32 orderDigest);
    error InvalidSignature(uint256 index);
    error SignerNotInCommittee(address signer, uint256 epoch);
    error DuplicateSigner(address signer);
    error NotEnoughSignatures(uint256 signers, uint256 required);
    error SlashOrderExpired(uint256 epoch, uint256 currentEpoch);

    constructor(
        IERC20 token_,
        address treasury_,
        uint256 minMasterStake_,
        uint256 unbondingDelay_,
        uint256 epochLength_,
        uint256 committeeSize_,
        uint256 maxCandidates_,
        uint256 equivocationSlashBps_,
        uint256 reporterShareBps_
    ) EIP712("ravenp2p", "1") {
        if (address(token_) == address(0)) revert ZeroAddress("token");
        if (treasury_ == address(0)) revert ZeroAddress("treasury");
        if (minMasterStake_ == 0) revert InvalidParameter("minMasterStake", minMasterStake_);
        if (epochLength_ == 0) revert InvalidParameter("epochLength", epochLength_);
        if (maxCandidates_ == 0 || maxCandidates_ > MAX_CANDIDATES_LIMIT) {
            revert InvalidParameter("maxCandidates", maxCandidates_);
        }
        if (committeeSize_ == 0 || committeeSize_ > maxCandidates_) {
            revert InvalidParameter("committeeSize", committeeSize_);
        }
        if (equivocationSlashBps_ > BPS) {
            revert InvalidParameter("equivocationSlashBps", equivocationSlashBps_);
        }
        if (reporterShareBps_ > BPS) revert InvalidParameter("reporterShareBps", reporterShareBps_);
        token = token_;
        treasury = treasury_;
        minMasterStake = minMasterStake_;
        unbondingDelay = unbondingDelay_;
        epochLength = epochLength_;
        committeeSize = committeeSize_;
        maxCandidates = maxCandidates_;
        equivocationSlashBps = equivocationSlashBps_;
        reporterShareBps = reporterShareBps_;
        genesis = block.timestamp;
    }

    // ------------------------------------------------------------------ stake

    /// @notice Moves `amount` of the caller's tokens (approved beforehand) into its active stake.
    function stake(uint256 amount) external nonReentrant {
        _stake(amount);
    }

    /// @notice `stake` with an EIP-2612 permit instead of a prior `approve`.
    /// @dev A failing permit is ignored (it may have been front-run); the transfer then needs the
    /// allowance to be there already.
    function stakeWithPermit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
    {
        try IERC20Permit(address(token)).permit(
            msg.sender, address(this), amount, deadline, v, r, s
        ) {} catch {}
        _stake(amount);
    }

    /// @notice Moves `amount` from active stake to unbonding and restarts the unbonding delay.
    /// @dev A candidate whose active stake falls below `minMasterStake` leaves the candidate set.
    function requestUnbond(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Stake storage s = _stakes[msg.sender];
        if (amount > s.active) revert InsufficientStake(msg.sender, amount, s.active);
        s.active -= amount;
        s.unbonding += amount;
        s.releaseTime = block.timestamp + unbondingDelay;
        if (_candidateSlot[msg.sender] != 0 && s.active < minMasterStake) {
            _removeCandidate(msg.sender);
        }
        emit UnbondRequested(msg.sender, amount, s.releaseTime);
        emit StakeChanged(msg.sender, s.active, s.unbonding);
    }

    /// @notice Pays out the caller's whole unbonding stake once its release time has come.
    function withdraw() external nonReentrant {
        Stake storage s = _stakes[msg.sender];
        uint256 amount = s.unbonding;
        if (amount == 0) revert NothingToWithdraw(msg.sender);
        if (block.timestamp < s.releaseTime) revert StillUnbonding(msg.sender, s.releaseTime);
        s.unbonding = 0;
        s.releaseTime = 0;
        emit Withdrawn(msg.sender, amount);
        emit StakeChanged(msg.sender, s.active, 0);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Sets the website partner that earns the partner fee on the caller's work.
    /// @param partner The partner's address, or the zero address for none.
    function setPartner(address partner) external {
        partnerOf[msg.sender] = partner;
        emit PartnerSet(msg.sender, partner);
    }

    /// @return active Stake that counts for election and can be slashed.
    /// @return unbonding Stake on its way out (still slashable until withdrawn).
    /// @return releaseTime When `unbonding` may be withdrawn (zero when nothing is unbonding).
    function stakeOf(address node)
        external
        view
        returns (uint256 active, uint256 unbonding, uint256 releaseTime)
    {
        Stake storage s = _stakes[node];
        return (s.active, s.unbonding, s.releaseTime);
    }

    /// @notice The constructor's numeric parameters, in the order of the Python `RegistryParams`.
    function params()
        external
        view
        returns (
            uint256 minMasterStake_,
            uint256 unbondingDelay_,
            uint256 epochLength_,
            uint256 committeeSize_,
            uint256 maxCandidates_,
            uint256 equivocationSlashBps_,
            uint256 reporterShareBps_
        )
    {
        return (
            minMasterStake,
            unbondingDelay,
            epochLength,
            committeeSize,
            maxCandidates,
            equivocationSlashBps,
            reporterShareBps
        );
    }

    // ------------------------------------------------------------ candidates

    /// @notice Enters the caller into the master candidate set.
    function becomeCandidate() external {
        if (_candidateSlot[msg.sender] != 0) revert AlreadyCandidate(msg.sender);
        uint256 active = _stakes[msg.sender].active;
        if (active < minMasterStake) revert StakeBelowMinimum(msg.sender, active, minMasterStake);
        if (_candidates.length >= maxCandidates) revert CandidateSetFull(maxCandidates);
        _candidates.push(msg.sender);
        _candidateSlot[msg.sender] = _candidates.length;
        emit CandidateAdded(msg.sender);
    }

    /// @notice Removes the caller from the master candidate set.
    function leaveCandidacy() external {
        if (_candidateSlot[msg.sender] == 0) revert NotCandidate(msg.sender);
        _removeCandidate(msg.sender);
    }

    /// @notice The candidate set in storage order (the order the election walks it in).
    function candidates() external view returns (address[] memory) {
        return _candidates;
    }

    function isCandidate(address node) external view returns (bool) {
        return _candidateSlot[node] != 0;
    }

    // -------------------------------------------------------------- election

    /// @notice The epoch the chain is in now: `(block.timestamp - genesis) / epochLength`.
    function currentEpoch() public view returns (uint256) {
        return (block.timestamp - genesis) / epochLength;
    }

    /// @notice Elects the committee of the current epoch; callable by anyone, once per epoch.
    /// @return elected The members in draw order.
    function elect() external returns (address[] memory elected) {
        uint256 epoch = currentEpoch();
        if (_elected[epoch]) revert EpochAlreadyElected(epoch);
        uint256 n = _candidates.length;
        address[] memory table = new address[](n);
        uint256[] memory weights = new uint256[](n);
        uint256 eligible;
        for (uint256 i; i < n; ++i) {
            address node = _candidates[i];
            uint256 active = _stakes[node].active;
            if (active >= minMasterStake) {
                table[eligible] = node;
                weights[eligible] = active;
                ++eligible;
            }
        }
        if (eligible == 0) revert NoEligibleCandidates(epoch);
        // Trim both arrays to the eligible entries (lengths only shrink, so memory stays valid).
        assembly ("memory-safe") {
            mstore(table, eligible)
            mstore(weights, eligible)
        }
        bytes32 seed = keccak256(abi.encode(blockhash(block.number - 1), epoch, address(this)));
        elected = Election.drawCommittee(table, weights, seed, committeeSize);
        _elected[epoch] = true;
        _seeds[epoch] = seed;
        _committees[epoch] = elected;
        emit CommitteeElected(epoch, seed, elected);
    }

    function isElected(uint256 epoch) external view returns (bool) {
        return _elected[epoch];
    }

    /// @notice The committee of `epoch` in draw order (empty while the epoch is not elected).
    function committee(uint256 epoch) external view returns (address[] memory) {
        return _committees[epoch];
    }

    /// @notice The seed `epoch`'s committee was drawn with (zero while not elected).
    function epochSeed(uint256 epoch) external view returns (bytes32) {
        return _seeds[epoch];
    }

    /// @notice The election's draw on any table, for off-chain code to check itself against.
    function drawCommittee(
        address[] calldata table,
        uint256[] calldata weights,
        bytes32 seed,
        uint256 k
    ) external pure returns (address[] memory) {
        return Election.drawCommittee(table, weights, seed, k);
    }

    // -------------------------------------------------------------- slashing

    /// @notice Slashes a worker that signed two different digests for one calculation.
    /// @dev Takes `equivocationSlashBps` of the worker's stake; the caller earns
    /// `reporterShareBps` of it, the treasury the rest. Once per (worker, job, calculation).
    function slashEquivocation(
        address worker,
        bytes32 job,
        uint64 calculation,
        bytes32 digestA,
        bytes calldata signatureA,
        bytes32 digestB,
        bytes calldata signatureB
    ) external nonReentrant {
        if (digestA == digestB) revert IdenticalDigests(digestA);
        _requireWorkerSigned(worker, resultDigest(job, calculation, digestA), signatureA);
        _requireWorkerSigned(worker, resultDigest(job, calculation, digestB), signatureB);
        bytes32 key = keccak256(abi.encode(worker, job, calculation));
        if (_equivocationSlashed[key]) revert EquivocationAlreadySlashed(worker, job, calculation);
        Stake storage s = _stakes[worker];
        uint256 amount = (s.active + s.unbonding) * equivocationSlashBps / BPS;
        if (amount == 0) revert NothingToSlash(worker);
        _equivocationSlashed[key] = true;
        _take(worker, amount);
        uint256 reward = amount * reporterShareBps / BPS;
        emit Slashed(worker, amount, msg.sender, reward, key);
        if (reward > 0) token.safeTransfer(msg.sender, reward);
        if (amount > reward) token.safeTransfer(treasury, amount - reward);
    }

    /// @notice Executes a slash order signed by more than half of `order.epoch`'s committee.
    /// @dev The amount is capped at the offender's stake and goes entirely to the treasury.
    /// Each order (by its EIP-712 digest) executes once.
    function slashByCommittee(SlashOrder calldata order, bytes[] calldata signatures)
        external
        nonReentrant
    {
        if (order.amount == 0) revert ZeroAmount();
        if (!_elected[order.epoch]) revert EpochNotElected(order.epoch);
        uint256 current = currentEpoch();
        if (order.epoch + 1 < current) revert SlashOrderExpired(order.epoch, current);
        bytes32 digest = slashOrderDigest(order);
        if (_orderExecuted[digest]) revert SlashOrderAlreadyExecuted(digest);
        address[] storage members = _committees[order.epoch];
        uint256 required = members.length / 2 + 1;
        if (signatures.length < required) revert NotEnoughSignatures(signatures.length, required);
        // The committee has at most 256 members (maxCandidates), so one word marks who signed.
        uint256 signed;
        for (uint256 i; i < signatures.length; ++i) {
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signatures[i]);
            if (err != ECDSA.RecoverError.NoError) revert InvalidSignature(i);
            uint256 index = _memberIndex(members, signer, order.epoch);
            if (signed & (1 << index) != 0) revert DuplicateSigner(signer);
            signed |= 1 << index;
        }
        Stake storage s = _stakes[order.offender];
        uint256 available = s.active + s.unbonding;
        if (available == 0) revert NothingToSlash(order.offender);
        uint256 amount = order.amount < available ? order.amount : available;
        _orderExecuted[digest] = true;
        _take(order.offender, amount);
        emit Slashed(order.offender, amount, msg.sender, 0, order.evidence);
        token.safeTransfer(treasury, amount);
    }

    /// @notice The EIP-712 digest a worker signs for its result of one calculation.
    function resultDigest(bytes32 job, uint64 calculation, bytes32 digest)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(RESULT_TYPEHASH, job, calculation, digest)));
    }

    /// @notice The EIP-712 digest committee members sign for a slash order.
    function slashOrderDigest(SlashOrder calldata order) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    SLASH_ORDER_TYPEHASH, order.offender, order.amount, order.evidence, order.epoch
                )
            )
        );
    }

    /// @notice The EIP-712 domain separator results and slash orders are signed under.
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // -------------------------------------------------------------- internal

    function _stake(uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        Stake storage s = _stakes[msg.sender];
        s.active += amount;
        emit StakeChanged(msg.sender, s.active, s.unbonding);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    function _removeCandidate(address node) private {
        // Swap-and-pop: the last candidate moves into the freed slot.
        uint256 index = _candidateSlot[node] - 1;
        uint256 lastIndex = _candidates.length - 1;
        if (index != lastIndex) {
            address moved = _candidates[lastIndex];
            _candidates[index] = moved;
            _candidateSlot[moved] = index + 1;
        }
        _candidates.pop();
        delete _candidateSlot[node];
        emit CandidateRemoved(node);
    }

    /// @dev Takes `amount` (at most the stake) from active stake first, then from unbonding.
    function _take(address node, uint256 amount) private {
        Stake storage s = _stakes[node];
        uint256 fromActive = amount < s.active ? amount : s.active;
        s.active -= fromActive;
        s.unbonding -= amount - fromActive;
        if (s.unbonding == 0) s.releaseTime = 0;
        // A candidate slashed below the minimum gives its slot back.
        if (_candidateSlot[node] != 0 && s.active < minMasterStake) _removeCandidate(node);
        emit StakeChanged(node, s.active, s.unbonding);
    }

    function _requireWorkerSigned(address worker, bytes32 digest, bytes calldata signature)
        private
        pure
    {
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        if (err != ECDSA.RecoverError.NoError || signer != worker) {
            revert SignatureNotByWorker(worker, signer);
        }
    }

    function _memberIndex(address[] storage members, address signer, uint256 epoch)
        private
        view
        returns (uint256)
    {
        for (uint256 i; i < members.length; ++i) {
            if (members[i] == signer) return i;
        }
        revert SignerNotInCommittee(signer, epoch);
    }
}
